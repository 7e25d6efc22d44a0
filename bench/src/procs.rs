//! Child processes pinned to a CPU, and their CPU time and memory from /proc.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

pub struct Child(std::process::Child);

impl Child {
    /// Starts `bin args...` on CPU `cpu` (through taskset).
    pub async fn spawn(bin: &Path, cpu: usize, args: &[&str]) -> anyhow::Result<Child> {
        if !bin.exists() {
            bail!("{} not found: build it with `cargo build --release --bins`", bin.display());
        }
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} under taskset", bin.display()))?;
        let mut child = Child(child);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // let it bind or fail
        if let Some(status) = child.0.try_wait()? {
            bail!("{} exited at start ({status}); is its port taken?", bin.display());
        }
        Ok(child)
    }

    fn proc_file(&self, name: &str) -> anyhow::Result<String> {
        let path = format!("/proc/{}/{name}", self.0.id());
        std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
    }

    /// CPU time so far, in microseconds: user (utime) and system (stime).
    pub fn cpu_us(&self) -> anyhow::Result<Cpu> {
        let stat = self.proc_file("stat")?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("parsing /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let us = |i: usize| -> anyhow::Result<u64> { Ok(fields[i].parse::<u64>()? * 1_000_000 / clock_ticks()) };
        Ok(Cpu { user: us(11)?, system: us(12)? })
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Resident set size, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = self.proc_file("status")?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub user: u64,
    pub system: u64,
}

impl Cpu {
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu { user: self.user - earlier.user, system: self.system - earlier.system }
    }
}

/// Counts a process's system calls with `perf stat -e raw_syscalls:sys_enter`, a kernel
/// tracepoint counter that costs the process almost nothing; `None` where perf is
/// missing or not allowed.
pub struct Syscalls(std::process::Child);

impl Syscalls {
    pub async fn start(pid: u32) -> Option<Syscalls> {
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // attached
        Some(Syscalls(child))
    }

    /// Stops counting; the count since `start`.
    pub fn stop(self) -> Option<u64> {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let out = self.0.wait_with_output().ok()?;
        // CSV: "COUNT,,raw_syscalls:sys_enter,..."
        let text = String::from_utf8_lossy(&out.stderr);
        text.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?.split(',').next()?.trim().parse().ok()
    }
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Pins this process to `cpu`.
pub fn pin_self(cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
}
