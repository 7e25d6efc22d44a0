//! The interop suite (`interop/run.py`): Python grpcio, an independent gRPC
//! implementation, as both client and servers of the real proxy binary, under no service
//! config, a retry policy, a hedging policy, and retries with health checking and
//! ejection (the grpcio servers answer Watch with UNIMPLEMENTED: healthy).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::Duration,
};

/// The script bounds itself at 90 s; this long without a line means it is stuck.
const SILENCE: Duration = Duration::from_secs(120);

#[test]
fn grpcio_clients_and_servers_interoperate_through_the_proxy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let grpcio = Command::new("python3").args(["-c", "import grpc"]).stderr(Stdio::null()).status();
    assert!(
        grpcio.is_ok_and(|s| s.success()),
        "the interop suite needs Python's grpcio: pip install grpcio (CI installs it)"
    );

    let (reader, writer) = std::io::pipe().expect("a pipe for the script's output");
    let mut command = Command::new("python3");
    command
        .arg(root.join("interop/run.py"))
        .arg("--proxy-bin")
        .arg(env!("CARGO_BIN_EXE_proxy"))
        .current_dir(root)
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer);
    let mut child = command.spawn().expect("starting python3 interop/run.py");
    drop(command); // closes our copies of the pipe's write end, so EOF comes when the script exits

    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if lines.send(text).is_err() {
                return;
            }
            line.clear();
        }
    });

    let mut output = String::new();
    loop {
        match received.recv_timeout(SILENCE) {
            Ok(line) => {
                println!("{line}");
                output.push_str(&line);
                output.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("interop/run.py printed nothing for {SILENCE:?} and was killed; its output:\n{output}");
            }
        }
    }
    let status = child.wait().expect("waiting for interop/run.py");
    assert!(status.success(), "interop/run.py failed ({status}); its output:\n{output}");
}
