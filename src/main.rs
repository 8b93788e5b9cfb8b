use clap::Parser;
use cnnserve::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.json_logs);
    // A panic is one log line, never a backtrace (the engine answers its requests 503 and goes on).
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%thread, %location, "panic: {message}");
    }));
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Forward(args)) => cli::forward(&args),
        Some(Command::Predict(args)) => cli::predict(&args),
        Some(Command::Finetune(args)) => cli::finetune(&args),
        Some(Command::Bench(args)) => cli::bench(&args),
        Some(Command::Healthcheck(args)) => cli::healthcheck(&args),
        Some(Command::FetchWeights(args)) => cli::fetch_weights(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A sentence, never a backtrace (anyhow's `Debug` adds one under RUST_BACKTRACE).
            eprintln!("error: {}", cli::error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: cli::ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(cli::serve(args))
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: container and service logs get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
