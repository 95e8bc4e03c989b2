//! Brokers from the distribution's packages, each started on a free
//! loopback port with its data in a directory of the caller's: a
//! `nats-server -js` and a Mosquitto with persistence. Used by the sink
//! tests and the benchmark.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A `nats-server -js` of the test's own.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Nats {
    /// `None` (one line saying so) when nats-server is not installed; in
    /// CI (`CI=true`) that fails the test.
    pub fn start(dir: &Path) -> Result<Option<Nats>> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but nats-server is not installed"
            );
            println!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
            return Ok(None);
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut nats = Nats {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        nats.up()?;
        Ok(Some(nats))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) -> Result {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the server with SIGTERM (it flushes its streams) and waits.
    pub fn down(&mut self) -> Result {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Mosquitto of the test's own, with persistence.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Result<Option<Mosquitto>> {
        if Command::new("mosquitto").arg("-h").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but mosquitto is not installed"
            );
            println!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return Ok(None);
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data)?;
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 # Without it, a burst of PUBACKs waits on the client's delayed\n\
                 # ACKs (about 40 ms each time).\n\
                 set_tcp_nodelay true\n\
                 persistence_location {}/\nmax_queued_messages 100000\n\
                 # Started as root, mosquitto would switch to its own user,\n\
                 # which cannot write here: its saved state would be lost.\n\
                 user root\n",
                data.display()
            ),
        )?;
        let mut broker = Mosquitto {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        broker.up()?;
        Ok(Some(broker))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) -> Result {
        self.child = Some(
            Command::new("mosquitto")
                .arg("-c")
                .arg(self.dir.join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM: the broker saves its state and stops.
    pub fn down(&mut self) -> Result {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
