//! JPEG decoding that reproduces libjpeg-turbo's default output bit for bit.
//!
//! Pillow decodes JPEGs with libjpeg-turbo using its defaults: the accurate integer IDCT
//! (`JDCT_ISLOW`), "fancy" triangular chroma upsampling, and fixed-point YCbCr → RGB tables.
//! Other decoders (the `image` crate uses zune-jpeg) round differently and move a tenth to a
//! quarter of the pixels by one to four levels. This module follows libjpeg-turbo's arithmetic
//! (`jidctint.c`, `jdsample.c`, `jdcolor.c`, `jdhuff.c`, `jdphuff.c`) so the pixels match.
//!
//! It covers what photos use: 8-bit Huffman-coded baseline, extended and progressive JPEGs with
//! one (gray) or three (YCbCr or RGB) components and integer sampling ratios. Anything else
//! (arithmetic coding, 12-bit, lossless, CMYK, progressive files whose coefficients were never
//! fully sent, which libjpeg smooths) is reported as [`JpegError::Unsupported`] and left to
//! the general-purpose decoder.
//!
//! Where libjpeg only warns and carries on with made-up data (a bad Huffman code, a scan that
//! ends early), we stop with an error: a half-decoded upload should be rejected, not classified.

/// Why a JPEG was not decoded here.
#[derive(Debug)]
pub(crate) enum JpegError {
    /// A valid JPEG that uses a feature this decoder does not implement.
    Unsupported(String),
    TooManyPixels {
        width: u32,
        height: u32,
    },
    /// Decoding would need more memory than the pixel limit allows (extreme block padding).
    TooLarge(String),
    Truncated(String),
    Corrupt(String),
}

type Result<T> = std::result::Result<T, JpegError>;

fn corrupt<T>(reason: impl Into<String>) -> Result<T> {
    Err(JpegError::Corrupt(reason.into()))
}

/// A decoded JPEG: gray (`channels == 1`) or RGB (`channels == 3`) rows, top to bottom.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub pixels: Vec<u8>,
    /// The TIFF structure of the first EXIF APP1 segment, for the orientation tag.
    pub exif: Option<Vec<u8>>,
}

/// Zigzag index → natural (row-major) index within an 8×8 block.
const NATURAL_ORDER: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Progressive files with more scans than this are refused (see the scan loop).
const MAX_SCANS: usize = 256;

/// Decode `data`, refusing frames larger than `max_pixels` before allocating anything.
pub(crate) fn decode(data: &[u8], max_pixels: u64) -> Result<Decoded> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return corrupt("missing start-of-image marker");
    }
    let mut st = State::default();
    let mut pos = 2;
    loop {
        let marker = next_marker(data, &mut pos)?;
        match marker {
            0xD9 => break,
            0xD8 => return corrupt("a second start-of-image marker"),
            // Stray restart markers and TEM carry no data; libjpeg skips them too.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let seg = segment(data, &mut pos, marker)?;
        match marker {
            0xC0..=0xC2 => st.frame(seg, marker == 0xC2, max_pixels)?,
            0xC3 => return unsupported("lossless JPEG"),
            0xC5..=0xC7 | 0xCD..=0xCF => return unsupported("hierarchical JPEG"),
            0xC9..=0xCB => return unsupported("arithmetic-coded JPEG"),
            0xC4 => st.huffman_tables(seg)?,
            0xCC => return unsupported("arithmetic-coded JPEG"),
            0xDB => st.quant_tables(seg)?,
            0xDD => {
                if seg.len() < 2 {
                    return corrupt("short DRI segment");
                }
                st.restart_interval = usize::from(u16::from_be_bytes([seg[0], seg[1]]));
            }
            0xDC => return unsupported("height defined later by a DNL marker"),
            0xDA => {
                if st.scans == MAX_SCANS {
                    // Each scan may cost a pass over every block for a few bytes of input
                    // (long end-of-band runs); real encoders use at most a few dozen.
                    return corrupt(format!("more than {MAX_SCANS} scans"));
                }
                pos = st.scan(seg, data, pos)?;
            }
            // libjpeg's examine_app0: JFIF identifier with at least 14 bytes of data.
            0xE0 if seg.len() >= 14 && seg.starts_with(b"JFIF\0") => st.jfif = true,
            0xE1 if st.exif.is_none() && seg.starts_with(b"Exif\0\0") => {
                st.exif = Some(seg[6..].to_vec());
            }
            // libjpeg's examine_app14: the transform byte of an Adobe segment.
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                st.adobe_transform = Some(seg[11]);
            }
            _ => {}
        }
    }
    st.finish()
}

fn unsupported<T>(what: &str) -> Result<T> {
    Err(JpegError::Unsupported(what.to_string()))
}

/// Find the next marker at or after `pos`, skipping fill bytes and (like libjpeg, which only
/// warns) stray bytes; leaves `pos` after the marker code.
fn next_marker(data: &[u8], pos: &mut usize) -> Result<u8> {
    loop {
        while *pos < data.len() && data[*pos] != 0xFF {
            *pos += 1;
        }
        while *pos < data.len() && data[*pos] == 0xFF {
            *pos += 1;
        }
        let Some(&code) = data.get(*pos) else {
            return Err(JpegError::Truncated(
                "the file ends before the end-of-image marker".into(),
            ));
        };
        *pos += 1;
        if code != 0 {
            return Ok(code);
        }
    }
}

/// The payload of the marker segment whose length field is at `pos`; advances past it.
fn segment<'a>(data: &'a [u8], pos: &mut usize, marker: u8) -> Result<&'a [u8]> {
    let Some(len) = data.get(*pos..*pos + 2) else {
        return Err(JpegError::Truncated(
            "the file ends inside a marker segment".into(),
        ));
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len < 2 {
        return corrupt(format!("marker FF{marker:02X} has an invalid length {len}"));
    }
    let Some(seg) = data.get(*pos + 2..*pos + len) else {
        return Err(JpegError::Truncated(
            "the file ends inside a marker segment".into(),
        ));
    };
    *pos += len;
    Ok(seg)
}

#[derive(Default)]
struct State {
    qt: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    frame: Option<Frame>,
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
    exif: Option<Vec<u8>>,
    scans: usize,
}

struct Frame {
    progressive: bool,
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    /// MCUs per row and per column of an interleaved scan.
    mcus_x: usize,
    mcus_y: usize,
    comps: Vec<Component>,
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// The quantisation table, latched at the component's first scan as libjpeg does.
    quant: Option<[u16; 64]>,
    /// libjpeg's downsampled_width / downsampled_height.
    ds_w: usize,
    ds_h: usize,
    /// Blocks that hold image samples (`ceil(ds / 8)`); MCU padding blocks are decoded and
    /// dropped since no output pixel depends on them.
    bw: usize,
    bh: usize,
    coefs: Vec<i16>,
    /// libjpeg's coef_bits for coefficients 0..=9: the last successive-approximation bit
    /// position sent, or -1 if none. Decides whether libjpeg would smooth blocks.
    coef_bits: [i32; 10],
    dc_pred: i32,
}

impl State {
    fn frame(&mut self, seg: &[u8], progressive: bool, max_pixels: u64) -> Result<()> {
        if self.frame.is_some() {
            return corrupt("more than one frame header");
        }
        if seg.len() < 6 {
            return corrupt("short frame header");
        }
        if seg[0] != 8 {
            return unsupported(&format!("{}-bit samples", seg[0]));
        }
        let height = usize::from(u16::from_be_bytes([seg[1], seg[2]]));
        let width = usize::from(u16::from_be_bytes([seg[3], seg[4]]));
        let ncomp = usize::from(seg[5]);
        if u64::try_from(width * height).unwrap_or(u64::MAX) > max_pixels {
            return Err(JpegError::TooManyPixels {
                width: width as u32,
                height: height as u32,
            });
        }
        if width == 0 || height == 0 {
            return corrupt(format!("empty frame size {width}x{height}"));
        }
        if ncomp != 1 && ncomp != 3 {
            return unsupported(&format!("{ncomp} colour components"));
        }
        if seg.len() < 6 + 3 * ncomp {
            return corrupt("short frame header");
        }
        let mut comps = Vec::with_capacity(ncomp);
        for c in seg[6..6 + 3 * ncomp].chunks_exact(3) {
            let (h, v, tq) = (
                usize::from(c[1] >> 4),
                usize::from(c[1] & 15),
                usize::from(c[2]),
            );
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                return corrupt("invalid component sampling factors or table");
            }
            comps.push(Component {
                id: c[0],
                h,
                v,
                tq,
                quant: None,
                ds_w: 0,
                ds_h: 0,
                bw: 0,
                bh: 0,
                coefs: Vec::new(),
                coef_bits: [-1; 10],
                dc_pred: 0,
            });
        }
        let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
        let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
        // jinit_upsampler accepts only integer ratios.
        if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
            return unsupported("fractional chroma sampling");
        }
        let mut total = 0usize;
        for c in &mut comps {
            c.ds_w = (width * c.h).div_ceil(hmax);
            c.ds_h = (height * c.v).div_ceil(vmax);
            c.bw = c.ds_w.div_ceil(8);
            c.bh = c.ds_h.div_ceil(8);
            total += c.bw * c.bh * 64;
        }
        // Coefficients (2 bytes) plus sample planes (1 byte) must fit the budget the other
        // decoders get. Only thin images with heavy block padding can exceed it.
        if (total as u64).saturating_mul(3) > super::decode::alloc_budget(max_pixels) {
            return Err(JpegError::TooLarge(format!(
                "a {width}x{height} JPEG with these sampling factors needs {total} coefficients"
            )));
        }
        for c in &mut comps {
            c.coefs = vec![0; c.bw * c.bh * 64];
        }
        self.frame = Some(Frame {
            progressive,
            width,
            height,
            hmax,
            vmax,
            mcus_x: width.div_ceil(8 * hmax),
            mcus_y: height.div_ceil(8 * vmax),
            comps,
        });
        Ok(())
    }

    fn quant_tables(&mut self, mut seg: &[u8]) -> Result<()> {
        while let Some(&pq_tq) = seg.first() {
            let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
            let size = if precision == 0 { 64 } else { 128 };
            if id > 3 || precision > 1 || seg.len() < 1 + size {
                return corrupt("invalid quantisation table");
            }
            let mut table = [0u16; 64];
            for (i, &n) in NATURAL_ORDER.iter().enumerate() {
                table[n] = if precision == 0 {
                    u16::from(seg[1 + i])
                } else {
                    u16::from_be_bytes([seg[1 + 2 * i], seg[2 + 2 * i]])
                };
            }
            self.qt[id] = Some(table);
            seg = &seg[1 + size..];
        }
        Ok(())
    }

    fn huffman_tables(&mut self, mut seg: &[u8]) -> Result<()> {
        while let Some(&tc_th) = seg.first() {
            let (class, id) = (tc_th >> 4, usize::from(tc_th & 15));
            if class > 1 || id > 3 || seg.len() < 17 {
                return corrupt("invalid Huffman table");
            }
            let counts: [u8; 16] = seg[1..17].try_into().unwrap_or([0; 16]);
            let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
            if n > 256 || seg.len() < 17 + n {
                return corrupt("invalid Huffman table");
            }
            let table = Huffman::new(&counts, &seg[17..17 + n])?;
            if class == 0 {
                self.dc_tables[id] = Some(table);
            } else {
                self.ac_tables[id] = Some(table);
            }
            seg = &seg[17 + n..];
        }
        Ok(())
    }

    /// Parse a scan header and decode the entropy-coded data that follows at `pos`; returns
    /// the position of the marker that ends it.
    fn scan(&mut self, seg: &[u8], data: &[u8], pos: usize) -> Result<usize> {
        let Some(frame) = self.frame.as_mut() else {
            return corrupt("scan before the frame header");
        };
        let n = usize::from(*seg.first().unwrap_or(&0));
        if n == 0 || n > 4 || seg.len() < 1 + 2 * n + 3 {
            return corrupt("invalid scan header");
        }
        let mut members = Vec::with_capacity(n);
        for s in seg[1..1 + 2 * n].chunks_exact(2) {
            let Some(ci) = frame.comps.iter().position(|c| c.id == s[0]) else {
                return corrupt("scan refers to an unknown component");
            };
            if members.iter().any(|m: &ScanComp| m.ci == ci) {
                return corrupt("component listed twice in a scan");
            }
            members.push(ScanComp {
                ci,
                dc: usize::from(s[1] >> 4),
                ac: usize::from(s[1] & 15),
            });
        }
        if n > 1
            && members
                .iter()
                .map(|m| frame.comps[m.ci].h * frame.comps[m.ci].v)
                .sum::<usize>()
                > 10
        {
            // libjpeg's D_MAX_BLOCKS_IN_MCU.
            return corrupt("too many blocks in an MCU");
        }
        let p = &seg[1 + 2 * n..];
        let (ss, se, ah, al) = (usize::from(p[0]), usize::from(p[1]), p[2] >> 4, p[2] & 15);

        let spec = if frame.progressive {
            // jdphuff.c start_pass_phuff_decoder's validity checks.
            let bad = if ss == 0 {
                se != 0
            } else {
                se < ss || se > 63 || n != 1
            };
            if bad || ah > 13 || al > 13 {
                return corrupt("invalid progressive scan parameters");
            }
            ScanSpec {
                ss,
                se,
                ah,
                al,
                progressive: true,
            }
        } else {
            // A sequential scan is always the full block; libjpeg only warns about odd values.
            ScanSpec {
                ss: 0,
                se: 63,
                ah: 0,
                al: 0,
                progressive: false,
            }
        };

        for m in &members {
            let comp = &mut frame.comps[m.ci];
            if comp.quant.is_none() {
                comp.quant = self.qt[comp.tq];
                if comp.quant.is_none() {
                    return corrupt("missing quantisation table");
                }
            }
            let needs_dc = spec.ss == 0 && spec.ah == 0;
            let needs_ac = spec.se > 0;
            if m.dc > 3 || m.ac > 3 {
                return corrupt("invalid Huffman table selector");
            }
            if needs_dc {
                match &self.dc_tables[m.dc] {
                    Some(t) if t.symbols.iter().all(|&s| s <= 15) => {}
                    Some(_) => return corrupt("invalid DC Huffman table"),
                    None => return corrupt("missing Huffman table"),
                }
            }
            if needs_ac && self.ac_tables[m.ac].is_none() {
                return corrupt("missing Huffman table");
            }
            // libjpeg's coef_bits bookkeeping (only the first 10 matter for smoothing).
            for k in spec.ss..=spec.se.min(9) {
                comp.coef_bits[k] = i32::from(spec.al);
            }
        }

        let mut dec = ScanDecoder {
            br: BitReader::new(data, pos),
            dc_tables: &self.dc_tables,
            ac_tables: &self.ac_tables,
            spec,
            eobrun: 0,
        };
        dec.run(frame, &members, self.restart_interval)?;
        self.scans += 1;
        Ok(dec.br.marker_position())
    }

    fn finish(self) -> Result<Decoded> {
        let Some(mut frame) = self.frame else {
            return corrupt("no frame header");
        };
        if self.scans == 0 {
            return corrupt("no image data");
        }
        // jdcoefct.c smoothing_ok: every component has some DC bits and some component lacks
        // AC bits among the first nine coefficients.
        if frame.progressive
            && frame.comps.iter().all(|c| c.coef_bits[0] >= 0)
            && frame
                .comps
                .iter()
                .any(|c| c.coef_bits[1..].iter().any(|&b| b != 0))
        {
            // libjpeg would estimate the missing AC coefficients (block smoothing).
            return unsupported("progressive JPEG with incomplete coefficients");
        }
        let color = match frame.comps.len() {
            1 => Color::Gray,
            _ => match (self.jfif, self.adobe_transform) {
                // jdapimin.c default_decompress_parms.
                (true, _) => Color::YCbCr,
                (false, Some(0)) => Color::Rgb,
                (false, Some(_)) => Color::YCbCr,
                (false, None) => {
                    let ids: Vec<u8> = frame.comps.iter().map(|c| c.id).collect();
                    if ids == b"RGB" {
                        Color::Rgb
                    } else {
                        Color::YCbCr
                    }
                }
            },
        };
        let planes: Vec<Plane> = frame.comps.iter_mut().map(Plane::from_component).collect();
        let pixels = output(&frame, &planes, color);
        Ok(Decoded {
            width: frame.width as u32,
            height: frame.height as u32,
            channels: if color == Color::Gray { 1 } else { 3 },
            pixels,
            exif: self.exif,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Entropy decoding

/// Reads entropy-coded bits, undoing byte stuffing. At a marker (or the end of the file) it
/// supplies zero bits as libjpeg does, and records that it had to.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    bits: u64,
    nbits: u32,
    /// Zero bits appended after the data ran out; they sit at the low end of `bits`.
    fake: u32,
    stopped: bool,
    overrun: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            bits: 0,
            nbits: 0,
            fake: 0,
            stopped: false,
            overrun: false,
        }
    }

    fn fill(&mut self) {
        while self.nbits <= 56 {
            let byte = if self.stopped {
                self.fake += 8;
                0
            } else {
                match self.data.get(self.pos) {
                    Some(0xFF) => {
                        // Skip fill bytes; FF 00 is a stuffed FF, anything else a marker.
                        let mut q = self.pos + 1;
                        while self.data.get(q) == Some(&0xFF) {
                            q += 1;
                        }
                        if self.data.get(q) == Some(&0) {
                            self.pos = q + 1;
                            0xFF
                        } else {
                            self.pos = q - 1;
                            self.stopped = true;
                            self.fake += 8;
                            0
                        }
                    }
                    Some(&b) => {
                        self.pos += 1;
                        b
                    }
                    None => {
                        self.stopped = true;
                        self.fake += 8;
                        0
                    }
                }
            };
            self.bits |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.nbits -= n;
        if self.fake > self.nbits {
            self.overrun = true;
            self.fake = self.nbits;
        }
    }

    #[inline]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.nbits < n {
            self.fill();
        }
        let v = (self.bits >> (64 - n)) as u32;
        self.consume(n);
        v
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    /// Discard buffered bits and expect restart marker `RST<n>` next.
    fn restart(&mut self, n: u8) -> Result<()> {
        if self.overrun {
            return self.overrun_error();
        }
        // Whatever is buffered is the padding of the last byte(s) before the marker.
        self.bits = 0;
        self.nbits = 0;
        self.fake = 0;
        self.stopped = false;
        let mut pos = self.pos;
        match next_marker(self.data, &mut pos) {
            Ok(m) if m == 0xD0 + n => {
                self.pos = pos;
                Ok(())
            }
            Ok(_) => corrupt("a restart marker is missing or out of order"),
            Err(e) => Err(e),
        }
    }

    fn overrun_error<T>(&self) -> Result<T> {
        if self.pos >= self.data.len() {
            Err(JpegError::Truncated(
                "the file ends inside the compressed image data".into(),
            ))
        } else {
            corrupt("the compressed image data ends early")
        }
    }

    /// Where the next marker starts, once the scan is done.
    fn marker_position(&self) -> usize {
        self.pos
    }
}

/// A Huffman table in libjpeg's decoding form, with a lookup table for short codes.
struct Huffman {
    /// For a 9-bit prefix: `(code length << 8) | symbol`, or 0 if the code is longer.
    fast: Vec<u16>,
    maxcode: [i32; 18],
    valoffset: [i32; 18],
    symbols: Vec<u8>,
}

const FAST_BITS: u32 = 9;

impl Huffman {
    /// jdhuff.c jpeg_make_d_derived_tbl, with its validity checks.
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Self> {
        let mut sizes = Vec::with_capacity(symbols.len());
        for (l, &c) in counts.iter().enumerate() {
            sizes.extend(std::iter::repeat_n(l as u32 + 1, usize::from(c)));
        }
        let mut codes = Vec::with_capacity(sizes.len());
        let mut code = 0u32;
        let mut si = sizes.first().copied().unwrap_or(1);
        let mut p = 0;
        while p < sizes.len() {
            while p < sizes.len() && sizes[p] == si {
                codes.push(code);
                code += 1;
                p += 1;
            }
            if code >= 1 << si {
                return corrupt("invalid Huffman table");
            }
            code <<= 1;
            si += 1;
        }
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 18];
        let mut p = 0usize;
        for l in 1..=16 {
            let c = usize::from(counts[l - 1]);
            if c > 0 {
                valoffset[l] = p as i32 - codes[p] as i32;
                p += c;
                maxcode[l] = codes[p - 1] as i32;
            }
        }
        maxcode[17] = i32::MAX;
        let mut fast = vec![0u16; 1 << FAST_BITS];
        for (i, (&len, &code)) in sizes.iter().zip(&codes).enumerate() {
            if len <= FAST_BITS {
                let shift = FAST_BITS - len;
                let base = (code << shift) as usize;
                for e in &mut fast[base..base + (1 << shift)] {
                    *e = ((len as u16) << 8) | u16::from(symbols[i]);
                }
            }
        }
        Ok(Huffman {
            fast,
            maxcode,
            valoffset,
            symbols: symbols.to_vec(),
        })
    }

    #[inline]
    fn decode(&self, br: &mut BitReader) -> Result<u8> {
        if br.nbits < 16 {
            br.fill();
        }
        let entry = self.fast[(br.bits >> (64 - FAST_BITS)) as usize];
        if entry != 0 {
            br.consume(u32::from(entry >> 8));
            return Ok(entry as u8);
        }
        for l in FAST_BITS as usize + 1..=16 {
            let code = (br.bits >> (64 - l)) as i32;
            if code <= self.maxcode[l] {
                br.consume(l as u32);
                let idx = code + self.valoffset[l];
                return match self.symbols.get(idx as usize) {
                    Some(&s) => Ok(s),
                    None => corrupt("bad Huffman code"),
                };
            }
        }
        // No code matched the next 16 bits. If some of them were zeros supplied after the data
        // ran out, the scan is short rather than wrong.
        if br.nbits - br.fake < 16 {
            return br.overrun_error();
        }
        corrupt("bad Huffman code")
    }
}

/// HUFF_EXTEND: the signed value of `s` magnitude bits `x`.
#[inline]
fn extend(x: u32, s: u32) -> i32 {
    if s == 0 {
        0
    } else if x < 1 << (s - 1) {
        x as i32 - (1 << s) + 1
    } else {
        x as i32
    }
}

#[derive(Clone, Copy)]
struct ScanSpec {
    ss: usize,
    se: usize,
    ah: u8,
    al: u8,
    progressive: bool,
}

struct ScanComp {
    ci: usize,
    dc: usize,
    ac: usize,
}

struct ScanDecoder<'a, 'd> {
    br: BitReader<'d>,
    dc_tables: &'a [Option<Huffman>; 4],
    ac_tables: &'a [Option<Huffman>; 4],
    spec: ScanSpec,
    eobrun: u32,
}

impl ScanDecoder<'_, '_> {
    fn run(
        &mut self,
        frame: &mut Frame,
        members: &[ScanComp],
        restart_interval: usize,
    ) -> Result<()> {
        for m in members {
            frame.comps[m.ci].dc_pred = 0;
        }
        let mut scratch = [0i16; 64];
        // A single-component scan is not interleaved: its MCU is one block and it covers only
        // the component's own blocks (jdinput.c per_scan_setup).
        let single = members.len() == 1;
        let (mcus_x, mcus_y) = if single {
            let c = &frame.comps[members[0].ci];
            (c.ds_w.div_ceil(8), c.ds_h.div_ceil(8))
        } else {
            (frame.mcus_x, frame.mcus_y)
        };
        let total = mcus_x * mcus_y;
        let mut restart_num = 0u8;
        for mcu in 0..total {
            if restart_interval > 0 && mcu > 0 && mcu % restart_interval == 0 {
                self.br.restart(restart_num)?;
                restart_num = (restart_num + 1) & 7;
                self.eobrun = 0;
                for m in members {
                    frame.comps[m.ci].dc_pred = 0;
                }
            }
            let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
            for m in members {
                let comp = &mut frame.comps[m.ci];
                let (bh, bv) = if single { (1, 1) } else { (comp.h, comp.v) };
                for by in 0..bv {
                    for bx in 0..bh {
                        let (x, y) = (mx * bh + bx, my * bv + by);
                        let block = if x < comp.bw && y < comp.bh {
                            let i = (y * comp.bw + x) * 64;
                            &mut comp.coefs[i..i + 64]
                        } else {
                            // MCU padding: decode to keep the bit stream and DC prediction
                            // in step, then forget.
                            scratch.fill(0);
                            &mut scratch[..]
                        };
                        self.block(block, &mut comp.dc_pred, m)?;
                    }
                }
            }
            if self.br.overrun {
                return self.br.overrun_error();
            }
        }
        Ok(())
    }

    fn block(&mut self, block: &mut [i16], dc_pred: &mut i32, m: &ScanComp) -> Result<()> {
        let spec = self.spec;
        if !spec.progressive {
            self.dc_first(block, dc_pred, m.dc, 0)?;
            return self.ac_first(block, m.ac, 1, 63, 0);
        }
        match (spec.ss, spec.ah) {
            (0, 0) => self.dc_first(block, dc_pred, m.dc, spec.al),
            (0, _) => {
                if self.br.bit() {
                    block[0] |= 1 << spec.al;
                }
                Ok(())
            }
            (_, 0) => {
                if self.eobrun > 0 {
                    self.eobrun -= 1;
                    return Ok(());
                }
                self.ac_first(block, m.ac, spec.ss, spec.se, spec.al)
            }
            _ => self.ac_refine(block, m.ac),
        }
    }

    fn dc_first(&mut self, block: &mut [i16], pred: &mut i32, table: usize, al: u8) -> Result<()> {
        let Some(t) = &self.dc_tables[table] else {
            return corrupt("missing Huffman table");
        };
        let s = u32::from(t.decode(&mut self.br)?);
        let diff = extend(self.br.bits(s), s);
        let Some(dc) = pred.checked_add(diff) else {
            return corrupt("DC coefficient out of range");
        };
        *pred = dc;
        block[0] = (dc << al) as i16;
        Ok(())
    }

    /// Baseline AC decoding and the first pass of a progressive AC band.
    fn ac_first(
        &mut self,
        block: &mut [i16],
        table: usize,
        ss: usize,
        se: usize,
        al: u8,
    ) -> Result<()> {
        let Some(t) = &self.ac_tables[table] else {
            return corrupt("missing Huffman table");
        };
        let mut k = ss;
        while k <= se {
            let rs = t.decode(&mut self.br)?;
            let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
            if s != 0 {
                k += r;
                if k > 63 {
                    return corrupt("AC coefficient index out of range");
                }
                let v = extend(self.br.bits(s), s);
                block[NATURAL_ORDER[k]] = (v << al) as i16;
            } else if r == 15 {
                k += 15;
            } else {
                if self.spec.progressive {
                    // EOBr: this block and 2^r - 1 + (r extra bits) more are done.
                    self.eobrun = (1 << r) + self.br.bits(r as u32) - 1;
                }
                break;
            }
            k += 1;
        }
        Ok(())
    }

    /// jdphuff.c decode_mcu_AC_refine.
    fn ac_refine(&mut self, block: &mut [i16], table: usize) -> Result<()> {
        let Some(t) = &self.ac_tables[table] else {
            return corrupt("missing Huffman table");
        };
        let (se, al) = (self.spec.se, self.spec.al);
        let p1: i16 = 1 << al;
        let m1: i16 = (-1i16) << al;
        let mut k = self.spec.ss;
        let refine = |br: &mut BitReader, coef: &mut i16| {
            if br.bit() && (*coef & p1) == 0 {
                // JCOEF arithmetic: wraps instead of overflowing on corrupt data.
                *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
            }
        };
        if self.eobrun == 0 {
            while k <= se {
                let rs = t.decode(&mut self.br)?;
                let (mut r, s) = (i32::from(rs >> 4), rs & 15);
                let mut value = 0;
                if s != 0 {
                    if s != 1 {
                        return corrupt("invalid coefficient size in a refinement scan");
                    }
                    value = if self.br.bit() { p1 } else { m1 };
                } else if r != 15 {
                    self.eobrun = (1 << r) + self.br.bits(r as u32);
                    break;
                }
                // Skip r zero coefficients, refining the nonzero ones passed on the way.
                while k <= se {
                    let coef = &mut block[NATURAL_ORDER[k]];
                    if *coef != 0 {
                        refine(&mut self.br, coef);
                    } else {
                        r -= 1;
                        if r < 0 {
                            break;
                        }
                    }
                    k += 1;
                }
                if value != 0 {
                    if k > 63 {
                        return corrupt("AC coefficient index out of range");
                    }
                    block[NATURAL_ORDER[k]] = value;
                }
                k += 1;
            }
        }
        if self.eobrun > 0 {
            for &n in NATURAL_ORDER.get(k..=se).unwrap_or(&[]) {
                if block[n] != 0 {
                    refine(&mut self.br, &mut block[n]);
                }
            }
            self.eobrun -= 1;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reconstruction

/// One component's samples after the IDCT, `stride` × (8 × block rows).
struct Plane {
    samples: Vec<u8>,
    stride: usize,
    ds_w: usize,
    ds_h: usize,
    h: usize,
    v: usize,
}

impl Plane {
    /// IDCT every block of `comp`, freeing its coefficients.
    fn from_component(comp: &mut Component) -> Plane {
        let stride = comp.bw * 8;
        let mut samples = vec![0u8; stride * comp.bh * 8];
        let quant = comp.quant.unwrap_or([0; 64]);
        let coefs = std::mem::take(&mut comp.coefs);
        for (i, block) in coefs.chunks_exact(64).enumerate() {
            let (bx, by) = (i % comp.bw, i / comp.bw);
            let out = &mut samples[by * 8 * stride + bx * 8..];
            idct_islow(block, &quant, out, stride);
        }
        Plane {
            samples,
            stride,
            ds_w: comp.ds_w,
            ds_h: comp.ds_h,
            h: comp.h,
            v: comp.v,
        }
    }
}

/// libjpeg's post-IDCT range limit: `x + 128` clamped, with libjpeg's wrap-around table for
/// wildly out-of-range values (only corrupt data gets there).
#[inline]
fn idct_limit(x: i64) -> u8 {
    let i = (x & 1023) as usize;
    match i {
        0..=127 => (i + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (i - 896) as u8,
    }
}

/// jidctint.c jpeg_idct_islow: the accurate integer IDCT, dequantising on the way.
fn idct_islow(coefs: &[i16], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    const CONST_BITS: u32 = 13;
    const PASS1_BITS: u32 = 2;
    const F_0_298: i64 = 2446;
    const F_0_390: i64 = 3196;
    const F_0_541: i64 = 4433;
    const F_0_765: i64 = 6270;
    const F_0_899: i64 = 7373;
    const F_1_175: i64 = 9633;
    const F_1_501: i64 = 12299;
    const F_1_847: i64 = 15137;
    const F_1_961: i64 = 16069;
    const F_2_053: i64 = 16819;
    const F_2_562: i64 = 20995;
    const F_3_072: i64 = 25172;
    #[inline]
    fn descale(x: i64, n: u32) -> i64 {
        (x + (1 << (n - 1))) >> n
    }
    /// The butterfly shared by both passes; returns the 8 outputs before descaling.
    #[inline]
    fn butterfly(i: [i64; 8]) -> [i64; 8] {
        let (z2, z3) = (i[2], i[6]);
        let z1 = (z2 + z3) * F_0_541;
        let tmp2 = z1 - z3 * F_1_847;
        let tmp3 = z1 + z2 * F_0_765;
        let tmp0 = (i[0] + i[4]) << CONST_BITS;
        let tmp1 = (i[0] - i[4]) << CONST_BITS;
        let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
        let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);

        let (mut t0, mut t1, mut t2, mut t3) = (i[7], i[5], i[3], i[1]);
        let z1 = t0 + t3;
        let z2 = t1 + t2;
        let z3 = t0 + t2;
        let z4 = t1 + t3;
        let z5 = (z3 + z4) * F_1_175;
        t0 *= F_0_298;
        t1 *= F_2_053;
        t2 *= F_3_072;
        t3 *= F_1_501;
        let z1 = -z1 * F_0_899;
        let z2 = -z2 * F_2_562;
        let z3 = -z3 * F_1_961 + z5;
        let z4 = -z4 * F_0_390 + z5;
        t0 += z1 + z3;
        t1 += z2 + z4;
        t2 += z2 + z3;
        t3 += z1 + z4;
        [
            tmp10 + t3,
            tmp11 + t2,
            tmp12 + t1,
            tmp13 + t0,
            tmp13 - t0,
            tmp12 - t1,
            tmp11 - t2,
            tmp10 - t3,
        ]
    }

    let mut ws = [0i64; 64];
    // Pass 1: columns, dequantising, scaled up by PASS1_BITS.
    for col in 0..8 {
        let input: [i64; 8] =
            std::array::from_fn(|r| i64::from(coefs[r * 8 + col]) * i64::from(quant[r * 8 + col]));
        if input[1..].iter().all(|&v| v == 0) {
            // libjpeg's DC-only shortcut; the full butterfly gives the same values.
            for r in 0..8 {
                ws[r * 8 + col] = input[0] << PASS1_BITS;
            }
            continue;
        }
        let o = butterfly(input);
        for r in 0..8 {
            // libjpeg stores the workspace as `int`.
            ws[r * 8 + col] = i64::from(descale(o[r], CONST_BITS - PASS1_BITS) as i32);
        }
    }
    // Pass 2: rows, descaled by PASS1_BITS and the 8 of the DCT's normalisation.
    for r in 0..8 {
        let row: [i64; 8] = ws[r * 8..r * 8 + 8].try_into().unwrap_or([0; 8]);
        let dst = &mut out[r * stride..r * stride + 8];
        if row[1..].iter().all(|&v| v == 0) {
            dst.fill(idct_limit(descale(row[0], PASS1_BITS + 3)));
            continue;
        }
        let o = butterfly(row);
        for (d, v) in dst.iter_mut().zip(o) {
            *d = idct_limit(descale(v, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Color {
    Gray,
    YCbCr,
    Rgb,
}

/// Upsample every component to full size and convert to the output colour space.
fn output(frame: &Frame, planes: &[Plane], color: Color) -> Vec<u8> {
    let (w, h) = (frame.width, frame.height);
    let channels = if color == Color::Gray { 1 } else { 3 };
    let mut out = vec![0u8; w * h * channels];
    let mut rows: Vec<Vec<u8>> = vec![vec![0u8; w]; planes.len()];
    let mut sums = Vec::new();
    let tables = ColorTables::new();
    for (y, dst) in out.chunks_exact_mut(w * channels).enumerate() {
        for (plane, row) in planes.iter().zip(rows.iter_mut()) {
            upsample_row(plane, frame.hmax, frame.vmax, y, row, &mut sums);
        }
        match color {
            Color::Gray => dst.copy_from_slice(&rows[0]),
            Color::Rgb => {
                let rgb = rows[0].iter().zip(&rows[1]).zip(&rows[2]);
                for (px, ((&r, &g), &b)) in dst.chunks_exact_mut(3).zip(rgb) {
                    px.copy_from_slice(&[r, g, b]);
                }
            }
            Color::YCbCr => {
                let ycc = rows[0].iter().zip(&rows[1]).zip(&rows[2]);
                for (px, ((&y, &cb), &cr)) in dst.chunks_exact_mut(3).zip(ycc) {
                    px.copy_from_slice(&tables.convert(y, cb, cr));
                }
            }
        }
    }
    out
}

/// Row `y` of `plane` upsampled to the full image width (`out.len()`), as jdsample.c does
/// with libjpeg's defaults (`do_fancy_upsampling = TRUE`).
fn upsample_row(
    p: &Plane,
    hmax: usize,
    vmax: usize,
    y: usize,
    out: &mut [u8],
    sums: &mut Vec<i32>,
) {
    let (hx, vx) = (hmax / p.h, vmax / p.v);
    let row = |r: usize| &p.samples[r * p.stride..r * p.stride + p.ds_w];
    // For vertical 2:1, the nearest input row and the next nearest: the row above for even
    // output rows, below for odd ones, repeating the edge rows like jdmainct.c's context rows.
    let (near, far) = if y.is_multiple_of(2) {
        (y / 2, (y / 2).saturating_sub(1))
    } else {
        (y / 2, (y / 2 + 1).min(p.ds_h - 1))
    };
    match (hx, vx) {
        (1, 1) => out.copy_from_slice(&row(y)[..out.len()]),
        // h2v1_fancy_upsample; images two samples wide or less get plain replication.
        (2, 1) if p.ds_w > 2 => {
            sums.clear();
            sums.extend(row(y).iter().map(|&v| i32::from(v)));
            fancy_horizontal(sums, out, 2, 1, 2);
        }
        // h1v2_fancy_upsample (always fancy, and no SIMD version on x86 to differ from).
        (1, 2) => {
            let bias = if y.is_multiple_of(2) { 1 } else { 2 };
            for ((o, &a), &b) in out.iter_mut().zip(row(near)).zip(row(far)) {
                *o = ((i32::from(a) * 3 + i32::from(b) + bias) >> 2) as u8;
            }
        }
        // h2v2_fancy_upsample: vertical triangle into column sums, then horizontal.
        (2, 2) if p.ds_w > 2 => {
            sums.clear();
            let cols = row(near).iter().zip(row(far));
            sums.extend(cols.map(|(&a, &b)| i32::from(a) * 3 + i32::from(b)));
            fancy_horizontal(sums, out, 4, 8, 7);
        }
        // int_upsample, h2v1_upsample, h2v2_upsample: replication.
        _ => {
            let src = row((y / vx).min(p.ds_h - 1));
            for (x, o) in out.iter_mut().enumerate() {
                *o = src[(x / hx).min(p.ds_w - 1)];
            }
        }
    }
}

/// The horizontal 2:1 triangle filter: output `2i` is `(3 c[i] + c[i - 1] + bias_even) >> shift`
/// and output `2i + 1` is `(3 c[i] + c[i + 1] + bias_odd) >> shift`, the edge sample standing in
/// for its missing neighbour (libjpeg's first- and last-column special cases).
fn fancy_horizontal(c: &[i32], out: &mut [u8], shift: u32, bias_even: i32, bias_odd: i32) {
    let last = c.len() - 1;
    for (i, pair) in out.chunks_mut(2).enumerate() {
        let near = c[i] * 3;
        pair[0] = ((near + c[i.saturating_sub(1)] + bias_even) >> shift) as u8;
        if let Some(o) = pair.get_mut(1) {
            *o = ((near + c[(i + 1).min(last)] + bias_odd) >> shift) as u8;
        }
    }
}

/// jdcolor.c build_ycc_rgb_table.
struct ColorTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl ColorTables {
    fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i64;
        let mut t = ColorTables {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cr_g[i] = (-fix(0.71414) * x) as i32;
            t.cb_g[i] = (-fix(0.34414) * x + ONE_HALF) as i32;
        }
        t
    }

    #[inline]
    fn convert(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        [
            clamp(y + self.cr_r[cr]),
            clamp(y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16)),
            clamp(y + self.cb_b[cb]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook inverse DCT in f64, for checking the integer version's accuracy.
    fn idct_float(coefs: &[i16; 64], quant: &[u16; 64]) -> [f64; 64] {
        let c = |u: usize| {
            if u == 0 {
                std::f64::consts::FRAC_1_SQRT_2
            } else {
                1.0
            }
        };
        let mut out = [0.0; 64];
        for y in 0..8 {
            for x in 0..8 {
                let mut s = 0.0;
                for v in 0..8 {
                    for u in 0..8 {
                        let f = f64::from(coefs[v * 8 + u]) * f64::from(quant[v * 8 + u]);
                        s += c(u)
                            * c(v)
                            * f
                            * ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos()
                            * ((2 * y + 1) as f64 * v as f64 * std::f64::consts::PI / 16.0).cos();
                    }
                }
                out[y * 8 + x] = (s / 4.0 + 128.0).clamp(0.0, 255.0);
            }
        }
        out
    }

    #[test]
    fn islow_idct_is_accurate() {
        let quant: [u16; 64] = std::array::from_fn(|i| 1 + (i as u16 % 7));
        let mut seed = 99u32;
        for round in 0..200 {
            let coefs: [i16; 64] = std::array::from_fn(|i| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let r = (seed >> 16) as i16 % 40 - 20;
                // Mostly low frequencies, like real blocks; every 4th block DC only.
                if i == 0 {
                    r * 8
                } else if round % 4 == 0 || i > 20 {
                    0
                } else {
                    r / (1 + i as i16 / 4)
                }
            });
            let mut out = [0u8; 64];
            idct_islow(&coefs, &quant, &mut out, 8);
            let want = idct_float(&coefs, &quant);
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(o) - w).abs() <= 1.0,
                    "round {round} sample {i}: {o} vs {w}"
                );
            }
        }
        // DC only: 8 * 1 / 8 = 1 above mid-grey everywhere.
        let mut dc = [0i16; 64];
        dc[0] = 8;
        let mut out = [0u8; 64];
        idct_islow(&dc, &[1; 64], &mut out, 8);
        assert_eq!(out, [129; 64]);
    }

    #[test]
    fn idct_range_limit_wraps_like_libjpeg() {
        assert_eq!(idct_limit(-128), 0);
        assert_eq!(idct_limit(0), 128);
        assert_eq!(idct_limit(127), 255);
        assert_eq!(idct_limit(300), 255);
        assert_eq!(idct_limit(-300), 0);
        // Beyond libjpeg's table the index wraps (only corrupt data gets there).
        assert_eq!(idct_limit(1024), 128);
    }

    #[test]
    fn color_tables_match_libjpeg() {
        let t = ColorTables::new();
        // Cr=>R is the nearest integer to 1.402 * (cr - 128), Cb=>B to 1.772 * (cb - 128).
        assert_eq!((t.cr_r[0], t.cr_r[255]), (-179, 178));
        assert_eq!((t.cb_b[0], t.cb_b[255]), (-227, 225));
        assert_eq!(t.convert(128, 128, 128), [128, 128, 128]);
        assert_eq!(t.convert(76, 85, 255), [254, 0, 0]);
        assert_eq!(t.convert(0, 0, 0), [0, 135, 0]);
    }

    #[test]
    fn fancy_upsampling_edges() {
        // h2v1: out[2i] = (3 s[i] + s[i-1] + 1) >> 2, out[2i+1] = (3 s[i] + s[i+1] + 2) >> 2,
        // with the edge sample repeated; an odd output width drops the last value.
        let s = [0, 100, 200];
        let mut out = [0u8; 5];
        fancy_horizontal(&s, &mut out, 2, 1, 2);
        assert_eq!(out, [0, 25, 75, 125, 175]);
    }

    #[test]
    fn huffman_tables_are_validated_and_decode() {
        // Three codes of length 2 and one of length 3: 00, 01, 10, 110.
        let mut counts = [0u8; 16];
        counts[1] = 3;
        counts[2] = 1;
        let table = Huffman::new(&counts, &[5, 6, 7, 8]).ok().unwrap();
        let data = [0b0001_1011, 0b0000_0000];
        let mut br = BitReader::new(&data, 0);
        let got: Vec<u8> = (0..4)
            .map(|_| table.decode(&mut br).ok().unwrap())
            .collect();
        assert_eq!(got, [5, 6, 7, 8]);
        // Five codes of length 2 cannot exist.
        counts[1] = 5;
        assert!(Huffman::new(&counts, &[1, 2, 3, 4, 5, 6]).is_err());
    }

    #[test]
    fn bit_reader_unstuffs_and_stops_at_markers() {
        let data = [0xFF, 0x00, 0xAB, 0xFF, 0xD9];
        let mut br = BitReader::new(&data, 0);
        assert_eq!(br.bits(8), 0xFF);
        assert_eq!(br.bits(8), 0xAB);
        assert!(!br.overrun);
        // Past the marker the reader supplies zeros and notes that it did.
        assert_eq!(br.bits(4), 0);
        assert!(br.overrun);
        assert_eq!(br.marker_position(), 3);
    }
}
