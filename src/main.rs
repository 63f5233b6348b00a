//! The `muxgate` command: parses the command line and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use muxgate::{mock, Authenticator, Config, Gateway, Workers};

#[derive(Parser)]
#[command(
    name = "muxgate",
    version,
    about = "One WebSocket per user, any number of streamed LLM answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML). Environment variables override it.
    #[arg(long, global = true, env = "MUXGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print a JWT signed with the configured secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "free")]
        tier: String,
        /// Lifetime, e.g. 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Run the OpenAI-compatible mock upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Require this API key as `Authorization: Bearer`.
        #[arg(long, env = "MOCK_API_KEY")]
        api_key: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The gateway's own runtime only accepts and runs background tasks: its connections are
    // served on the worker threads `serve` starts (see `muxgate::Workers`). The mock upstream
    // keeps tokio's work-stealing runtime.
    let serving = matches!(cli.command, None | Some(Command::Serve));
    let runtime = if serving {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("muxgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line, whatever RUST_BACKTRACE says.
            eprintln!("muxgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing(cli.log_json);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Token { user, tier, ttl } => {
            let config = Config::load(cli.config.as_deref())?;
            let secret = config.auth.jwt_secret.as_deref().context(
                "no JWT secret configured: set MUXGATE_JWT_SECRET or auth.jwt_secret_env",
            )?;
            let ttl = parse_ttl(&ttl).map_err(anyhow::Error::msg)?;
            let authn =
                Authenticator::new(secret.as_bytes(), 0, config.tiers.keys().cloned().collect());
            let token = authn.issue(&user, &tier, ttl)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{token}");
            }
            Ok(())
        }
        Command::MockUpstream { listen, api_key } => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let addr = listener.local_addr()?;
            announce(&format!("mock-upstream: listening on http://{addr}"));
            mock::run(listener, mock::MockState::new(api_key), shutdown_signal()).await?;
            Ok(())
        }
    }
}

async fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_path.as_deref())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let workers =
        Workers::start(config.server.worker_count()).context("cannot start the workers")?;
    let gw = Gateway::start(config).await?;
    if gw.config().is_dev() {
        let upstream = match gw.simulated_upstream() {
            Some(url) => format!("the built-in simulated provider ({url}), no API key needed"),
            None => "the configured upstream".to_string(),
        };
        let secret = if gw.has_ephemeral_secret() {
            "a random JWT secret (tokens die with the process)"
        } else {
            "the configured JWT secret"
        };
        tracing::warn!("DEV MODE: demo tokens at /dev/token, {secret}; streams go to {upstream}. Set MUXGATE_JWT_SECRET for production.");
        announce(&format!(
            "muxgate dev mode: open http://{addr}/ for the demo chat"
        ));
    }
    announce(&format!("muxgate: listening on http://{addr}"));
    muxgate::serve_on(listener, gw, &workers, shutdown_signal()).await?;
    Ok(())
}

/// One line on stdout that scripts and tests wait for.
#[allow(clippy::print_stdout)]
fn announce(line: &str) {
    use std::io::Write;
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUXGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal: in a file or a journal the escape codes are noise, and
    // painting each field name cost a third of the `stream ended` line's instructions.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Parses a duration like `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
