use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use server::{Args, Config, config::Command};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    balancer::telemetry::init();
    match args.command {
        Some(Command::HealthCheck { addr }) => balancer::probe::exit_with_health(addr).await,
        Some(Command::Certs { out, names }) => {
            let made = grpc_h3::certs::ensure(&out, &names).map_err(|e| anyhow::anyhow!("certs: {e}"))?;
            let done = match made {
                grpc_h3::certs::Made::Written => "wrote",
                grpc_h3::certs::Made::Kept => "kept (made for the same names)",
            };
            println!("{done} {}/ca.pem, cert.pem, key.pem for {}", out.display(), names.join(", "));
            return Ok(());
        }
        None => {}
    }
    let mut cfg = Config::try_from(args.serve.clone()).context("--tls-cert/--tls-key")?;
    cfg.sick = toggle_on_sigusr1();
    let listener = tokio::net::TcpListener::bind(args.serve.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.serve.listen))?;
    server::run(cfg, listener, balancer::signal::terminate()).await
}

/// SIGUSR1 makes the replica sick (health NOT_SERVING, calls UNAVAILABLE); the next one
/// makes it well again. `docker kill --signal USR1` works on images without a shell.
fn toggle_on_sigusr1() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    match signal(SignalKind::user_defined1()) {
        Ok(mut usr1) => {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    tx.send_modify(|sick| *sick = !*sick);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "No SIGUSR1 handler; the replica cannot be made sick"),
    }
    rx
}
