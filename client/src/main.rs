//! The sandbox's client: one call, open-loop load with a summary, a verify-lb table,
//! and a stream that survives server restarts. Talks to the proxy, or balances by
//! itself with the `balancer` library when `--target` is given.

mod conn;
mod load;
mod report;
mod stream;
mod top;
mod verify;

use clap::{Parser, Subcommand};

/// Calls hello.HelloService through the proxy (default) or directly with client-side
/// balancing (--target).
#[derive(Debug, Parser)]
#[command(name = "client", version, about)]
struct Args {
    #[command(flatten)]
    conn: conn::ConnArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One SayHello call; prints the reply.
    Hello {
        #[arg(long, default_value = "World")]
        name: String,
    },
    /// Open-loop load at a fixed rate, with a live progress line and a summary.
    Load(load::LoadArgs),
    /// N calls, then a table of calls per replica against the expected share.
    VerifyLb(verify::VerifyArgs),
    /// A SayHelloStream that re-opens where it left off when it breaks.
    Stream(stream::StreamArgs),
    /// A live view of the proxies from their admin APIs: each replica's state,
    /// traffic share, success rate and latency, and the events. Needs a terminal.
    Top(top::TopArgs),
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    if std::env::var_os("RUST_LOG").is_some() {
        balancer::telemetry::init();
    }
    // The view reads the proxies' admin APIs: no gRPC connection.
    let command = match args.command {
        Command::Top(a) => return top::run(a).await,
        command => command,
    };
    let conn = conn::Conn::open(&args.conn).await?;
    match command {
        Command::Hello { name } => {
            let r = conn
                .hello(&name)
                .await
                .map_err(|s| anyhow::anyhow!("calling {}: {}", conn.describe(), conn::explain(&s)))?;
            println!("{}", r.message);
            println!("  server={} node={} address={}", r.server, r.node, r.address);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Load(a) => load::run(conn, a).await,
        Command::VerifyLb(a) => verify::run(conn, a).await,
        Command::Stream(a) => stream::run(conn, a).await,
        Command::Top(_) => unreachable!("dispatched before connecting"),
    }
}
