//! torch `.pth` readers (placeholder: being written).
