use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use proxy::config::{Args, Command};

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // One thread: the current-thread scheduler, with no cross-thread wake-ups.
    let mut rt = match args.serve.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        balancer::telemetry::init();
        if let Some(Command::HealthCheck { addr }) = args.command {
            balancer::probe::exit_with_health(addr).await;
        }
        // Bad settings are reported before anything binds.
        args.serve.settings()?;
        let listener = tokio::net::TcpListener::bind(args.serve.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.serve.listen))?;
        proxy::run(args.serve, listener, balancer::signal::terminate()).await
    })
}
