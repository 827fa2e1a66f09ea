//! Child processes the demo and the benchmark start: stopped on drop, waited for by port.

use std::{
    net::{TcpListener, TcpStream},
    process::{Child, Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;

const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A child process stopped with `signal` (SIGKILL if that fails) when dropped, so that a failed
/// run leaves no server or agent behind.
pub struct ChildGuard {
    pub child: Child,
    pub signal: &'static str,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and waits up to `timeout` for the exit. nginx needs a catchable signal:
    /// a SIGKILLed master leaves its workers running.
    pub fn stop_within(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        crate::run(
            Command::new("kill").args([format!("-{}", self.signal), self.pid().to_string()]),
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "pid {} still runs {timeout:?} after SIG{}",
                    self.pid(),
                    self.signal
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_within(STOP_TIMEOUT)
    }

    /// Returns once something accepts connections on `port`; fails if the child exits first.
    pub fn wait_for_port(&mut self, port: u16, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{what} exited with {status} before listening on port {port}");
            }
            if Instant::now() > deadline {
                bail!("{what} did not listen on port {port}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
