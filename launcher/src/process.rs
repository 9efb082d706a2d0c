//! One supervised child process (a shard or the router): started in its own process
//! group (so a terminal's Ctrl-C reaches only the launcher, which stops children in
//! order), its output relayed line by line, its exit reported on a shared channel,
//! and stopped with SIGTERM, then SIGKILL after a grace period.

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};

/// stderr lines kept to explain a crash.
const STDERR_TAIL_LINES: usize = 20;
/// How long an exited child's output may keep flowing (from grandchildren holding the
/// pipes) before its exit is reported anyway.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ProcessSpec {
    /// Shown in relayed output and in messages: "shard-0", "router".
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// Children log JSON lines; relayed lines get a `"process"` field.
    pub json_output: bool,
}

/// A child's exit, as reported on the exit channel.
#[derive(Debug)]
pub struct ExitReport {
    pub name: String,
    pub status: std::io::Result<ExitStatus>,
    pub stderr_tail: Vec<String>,
}

impl ExitReport {
    /// "exit code 1" / "killed by signal SIGKILL".
    pub fn describe(&self) -> String {
        let status = match &self.status {
            Ok(status) => status,
            Err(e) => return format!("status unknown: {e}"),
        };
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal).map_or(signal.to_string(), |s| s.as_str().to_string());
                format!("killed by signal {name}")
            }
            (None, None) => status.to_string(),
        }
    }
}

pub struct ManagedProcess {
    pub name: String,
    pid: Pid,
    exited: watch::Receiver<bool>,
}

impl ManagedProcess {
    /// Starts the child; its exit will be sent on `exits`.
    pub fn spawn(spec: ProcessSpec, exits: mpsc::UnboundedSender<ExitReport>) -> Result<Self> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .envs(spec.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Backstop if the launcher returns without stopping it.
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        // The child is told to stop if the launcher dies (even by SIGKILL): no orphans.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        let pid = Pid::from_raw(child.id().context("child has no pid")? as i32);
        tracing::info!("Started {} (pid {pid})", spec.name);

        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
        let relays = [
            tokio::spawn(relay(child.stdout.take().context("no stdout")?, spec.name.clone(), spec.json_output, None)),
            tokio::spawn(relay(
                child.stderr.take().context("no stderr")?,
                spec.name.clone(),
                spec.json_output,
                Some(stderr_tail.clone()),
            )),
        ];
        let (exited_tx, exited) = watch::channel(false);
        let name = spec.name.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Reaped: from now on its pid may be reused, so it must not be signalled.
            let _ = exited_tx.send(true);
            let deadline = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
            for relay in relays {
                let _ = timeout_at(deadline, relay).await;
            }
            let stderr_tail = stderr_tail.lock().unwrap().drain(..).collect();
            let _ = exits.send(ExitReport { name, status, stderr_tail });
        });
        Ok(Self { name: spec.name, pid, exited })
    }

    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    fn signal(&self, signal: Signal) {
        // Reaped children are never signalled: their pid may belong to someone else now.
        if !self.has_exited() {
            let _ = kill(self.pid, signal);
        }
    }

    async fn wait_until(&mut self, deadline: Instant) -> bool {
        timeout_at(deadline, self.exited.wait_for(|exited| *exited)).await.is_ok()
    }
}

/// Stops `processes` together: SIGTERM, then SIGKILL for those still running after `grace`.
/// SIGCONT follows SIGTERM: a stopped child (SIGSTOP, a debugger) would otherwise hold
/// its SIGTERM pending for the whole grace period.
pub async fn stop_all(processes: &mut [ManagedProcess], grace: Duration) {
    let running: Vec<&mut ManagedProcess> = processes.iter_mut().filter(|p| !p.has_exited()).collect();
    for process in &running {
        tracing::info!("Stopping {}", process.name);
        process.signal(Signal::SIGTERM);
        process.signal(Signal::SIGCONT);
    }
    let deadline = Instant::now() + grace;
    for process in running {
        if !process.wait_until(deadline).await {
            tracing::warn!("{} still running after {grace:?}: killing it", process.name);
            process.signal(Signal::SIGKILL);
            process.exited.wait_for(|exited| *exited).await.ok();
        }
        tracing::info!("{} stopped", process.name);
    }
}

/// Copies a child's output to ours line by line, each line marked with the child's name.
/// Child stdout goes to our stdout and child stderr (kept in `tail`) to our stderr.
async fn relay(
    stream: impl AsyncRead + Unpin,
    name: String,
    json_output: bool,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let out = format_line(&name, &line, json_output);
        match &tail {
            Some(tail) => {
                eprintln!("{out}");
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            None => println!("{out}"),
        }
    }
}

/// `[shard-0] <line>`, or with JSON logs the child's JSON object with a `"process"`
/// field added (non-JSON lines, like panics, wrapped as `{"process", "message"}`).
fn format_line(name: &str, line: &str, json_output: bool) -> String {
    if !json_output {
        return format!("[{name}] {line}");
    }
    let mut object = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(object)) => object,
        _ => serde_json::Map::from_iter([("message".to_string(), line.into())]),
    };
    object.insert("process".to_string(), name.into());
    serde_json::Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> ProcessSpec {
        ProcessSpec {
            name: "test-child".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            envs: vec![("GREETING".into(), "hello".into())],
            json_output: false,
        }
    }

    #[tokio::test]
    async fn reports_exit_code_and_stderr_tail() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _child = ManagedProcess::spawn(spec("echo out; echo $GREETING >&2; exit 3"), tx).unwrap();
        let report = rx.recv().await.unwrap();
        assert_eq!(report.name, "test-child");
        assert_eq!(report.describe(), "exit code 3");
        assert_eq!(report.stderr_tail, vec!["hello"]);
    }

    #[tokio::test]
    async fn sigterm_stops_a_child() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut children = vec![ManagedProcess::spawn(spec("sleep 30"), tx).unwrap()];
        stop_all(&mut children, Duration::from_secs(10)).await;
        assert!(children[0].has_exited());
        assert_eq!(rx.recv().await.unwrap().describe(), "killed by signal SIGTERM");
    }

    #[tokio::test]
    async fn sigkill_after_the_grace_period() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // `exec` so the signal reaches the process that ignores SIGTERM, not a shell.
        let mut children = vec![ManagedProcess::spawn(spec("trap '' TERM; exec sleep 30"), tx).unwrap()];
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        stop_all(&mut children, Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(rx.recv().await.unwrap().describe(), "killed by signal SIGKILL");
    }

    #[test]
    fn json_lines_get_the_process_name() {
        assert_eq!(format_line("shard-0", "loading", false), "[shard-0] loading");
        let line: serde_json::Value =
            serde_json::from_str(&format_line("shard-0", r#"{"level":"INFO","msg":"hi"}"#, true)).unwrap();
        assert_eq!(line["process"], "shard-0");
        assert_eq!(line["msg"], "hi");
        let panic: serde_json::Value = serde_json::from_str(&format_line("router", "thread panicked", true)).unwrap();
        assert_eq!(panic["message"], "thread panicked");
    }
}
