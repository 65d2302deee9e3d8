//! A real `redis-server` for the shared-tier tests: on a free loopback port, in a temporary
//! directory, with no persistence; killed when dropped. `.ci/run` installs the Debian package.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (a password, a TLS port).
    extra: Vec<String>,
}

/// The server binary; the tests need it (`apt-get install redis-server`, which `.ci/run` does).
fn binary() -> &'static str {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        panic!(
            "redis-server is not installed: the shared-tier tests run against a real one (apt-get install redis-server; .ci/run installs it)"
        );
    }
    "redis-server"
}

impl Redis {
    /// A new server on a free port.
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// A new server on a free port, with more arguments.
    pub fn start_with(extra: Vec<String>) -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            extra,
        };
        redis.launch();
        redis
    }

    /// The server's working directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new(binary())
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the server answers `PING` now (`+PONG`, or `-NOAUTH` with a password).
    pub fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reply = [0u8; 1];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && matches!(&reply, b"+" | b"-")
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// SIGKILL: the server is gone, its connections reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new server on the same port, after [`Redis::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// SIGSTOP: connections stay open and nothing is answered.
    pub fn freeze(&self) {
        signal("STOP", &self.pid());
    }

    /// SIGCONT after [`Redis::freeze`].
    pub fn thaw(&self) {
        signal("CONT", &self.pid());
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn signal(name: &str, pid: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid)
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server would not die of SIGTERM; SIGKILL works either way.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
