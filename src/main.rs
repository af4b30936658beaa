//! The walnats binary: command line → config → the chosen command.
//! Orchestration only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use walnats::config::Config;

// glibc malloc was ~30% of walnats' CPU under load (perf, scripts/bench):
// every event allocates a few short-lived buffers and headers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use walnats::error::{Error, Kind};

#[derive(Parser)]
#[command(
    name = "walnats",
    version,
    about = "PostgreSQL logical replication to NATS JetStream, exactly once"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The TOML config file; every key can be overridden by WALNATS_<SECTION>_<KEY>.
    #[arg(long, default_value = "walnats.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Stream until SIGTERM/SIGINT, then drain and exit 0.
    Run(ConfigArg),
    /// Check every prerequisite and print a checklist with fixes.
    Check(ConfigArg),
    /// Slot, lag, checkpoint and stream figures.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read tables into the stream while `run` keeps streaming.
    Snapshot {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Print events from the stream for a human.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// Subjects below the prefix, e.g. `public.orders` or `*.*.delete`.
        filter: Option<String>,
        /// Start from the stream's first message instead of new ones.
        #[arg(long)]
        from_start: bool,
        /// Start from this far back (90s, 10m, 2h, 1d) or an RFC 3339 time.
        #[arg(long, conflicts_with = "from_start")]
        since: Option<String>,
        /// Pretty-print JSON bodies.
        #[arg(long)]
        pretty: bool,
    },
    /// Slot management.
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
}

#[derive(Subcommand)]
enum SlotCommand {
    /// Drop the replication slot and walnats' checkpoint (never done implicitly).
    Drop {
        #[command(flatten)]
        config: ConfigArg,
        /// Confirm: changes not yet published are lost with the slot.
        #[arg(long)]
        yes: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALNATS_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    // tokio-postgres logs each statement's parameters at debug, and the
    // snapshot's carry key values: row values never reach the log.
    let filter = match "tokio_postgres=info".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(arg: &ConfigArg) -> Result<Arc<Config>, Error> {
    let cfg = Config::load(&arg.config, std::env::vars())?;
    for name in &cfg.env_ignored {
        tracing::warn!(variable = %name, "environment variable names no config key; ignored (a typo?)");
    }
    Ok(Arc::new(cfg))
}

/// SIGTERM and SIGINT flip the watch; the pipeline drains and returns.
fn shutdown_signal() -> Result<watch::Receiver<bool>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::with_source(Kind::Io, "cannot install the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::with_source(Kind::Io, "cannot install the SIGINT handler", e))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; stopping");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn dispatch(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run(c) => {
            let cfg = load(&c)?;
            let shutdown = shutdown_signal()?;
            let health = Arc::new(walnats::metrics::Health::default());
            let metrics = walnats::metrics::install_metrics()?;
            if let Some(addr) = cfg.http_listen {
                walnats::http::serve(addr, metrics, Arc::clone(&health), Arc::clone(&cfg)).await?;
            }
            walnats::pipeline::run(cfg, shutdown, health).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(c) => {
            let cfg = load(&c)?;
            let ok = walnats::admin::check(&cfg).await;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Status { config, json } => {
            let cfg = load(&config)?;
            walnats::admin::status(&cfg, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slot {
            command: SlotCommand::Drop { config, yes },
        } => {
            let cfg = load(&config)?;
            if !yes {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "dropping slot {:?} loses every change not yet published: add --yes to confirm",
                        cfg.postgres.slot
                    ),
                ));
            }
            walnats::admin::slot_drop(&cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { config, tables } => {
            let cfg = load(&config)?;
            walnats::admin::snapshot_request(&cfg, &tables).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail {
            config,
            filter,
            from_start,
            since,
            pretty,
        } => {
            let cfg = load(&config)?;
            walnats::tail::tail(
                &cfg,
                filter.as_deref(),
                from_start,
                since.as_deref(),
                pretty,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("walnats")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walnats: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line, on stderr, whatever the log format: it names what
            // failed and the fix.
            eprintln!("walnats: {e}");
            if e.kind() == Kind::Config {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
