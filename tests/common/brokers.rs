//! Brokers from the distribution's packages, each started on a free
//! loopback port with its data in a directory of the caller's: a
//! `nats-server -js` and a Mosquitto with persistence. Used by the sink
//! tests and the benchmark.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Whether `program` runs; when it does not, one line says so (and in CI,
/// `CI=true`, that fails the test).
fn installed(program: &str, arg: &str) -> bool {
    if Command::new(program).arg(arg).output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {program} is not installed"
    );
    println!("SKIPPED: {program} is not installed (apt-get install {program})");
    false
}

/// Starts `command` quietly and waits until it listens on `port`.
///
/// An error when the server exits instead, or soon after: the port was
/// taken (another test's server may have bound it between our choice of
/// it and our server's start, and then answered the connect), and the
/// caller starts again on another port.
fn listening(command: &mut Command, port: u16) -> Result<Child> {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = |child: &mut Child| -> Result<()> {
        match child.try_wait()? {
            Some(status) => {
                Err(format!("{command:?} exited ({status}): port {port} taken?").into())
            }
            None => Ok(()),
        }
    };
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        exited(&mut child)?;
        assert!(Instant::now() < deadline, "{command:?} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A server that cannot bind its port exits at once.
    std::thread::sleep(Duration::from_millis(300));
    exited(&mut child)?;
    Ok(child)
}

/// Runs `start` with free ports until one is not taken by the time the
/// server binds it (at most five tries).
fn on_a_free_port<T>(mut start: impl FnMut(u16) -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        match start(port) {
            Err(e) if tries < 4 => {
                eprintln!("{e}; trying another port");
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Stops a server with SIGTERM (it saves what it holds) and waits.
fn terminate(child: Option<Child>) -> Result {
    if let Some(mut child) = child {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        child.wait()?;
    }
    Ok(())
}

/// A `nats-server -js` of the test's own.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// The server's certificate and key, when it speaks TLS only.
    tls: Option<Certificates>,
}

impl Nats {
    /// `None` (one line saying so) when nats-server is not installed; in
    /// CI (`CI=true`) that fails the test.
    pub fn start(dir: &Path) -> Result<Option<Nats>> {
        Nats::start_with(dir, None)
    }

    /// A server that requires TLS with `certificates`' server certificate.
    pub fn start_tls(dir: &Path, certificates: &Certificates) -> Result<Option<Nats>> {
        Nats::start_with(dir, Some(certificates.clone()))
    }

    fn start_with(dir: &Path, tls: Option<Certificates>) -> Result<Option<Nats>> {
        if !installed("nats-server", "--version") {
            return Ok(None);
        }
        on_a_free_port(|port| {
            let mut nats = Nats {
                child: None,
                port,
                dir: dir.to_owned(),
                tls: tls.clone(),
            };
            nats.up()?;
            Ok(Some(nats))
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) -> Result {
        let mut command = Command::new("nats-server");
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("js"))
            .args(self.tls.iter().flat_map(|c| {
                [
                    "--tls".into(),
                    "--tlscert".into(),
                    c.cert.clone().into_os_string(),
                    "--tlskey".into(),
                    c.key.clone().into_os_string(),
                ]
            }));
        self.child = Some(listening(&mut command, self.port)?);
        Ok(())
    }

    /// Stops the server with SIGTERM (it flushes its streams) and waits.
    pub fn down(&mut self) -> Result {
        terminate(self.child.take())
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
        Mosquitto::start_with(dir, None, None)
    }

    /// A broker that lets in `user` with `password` and nobody else.
    pub fn start_auth(dir: &Path, user: &str, password: &str) -> Result<Option<Mosquitto>> {
        Mosquitto::start_with(dir, None, Some((user, password)))
    }

    /// A broker that speaks only TLS, with `certificates`' server
    /// certificate.
    pub fn start_tls(dir: &Path, certificates: &Certificates) -> Result<Option<Mosquitto>> {
        Mosquitto::start_with(dir, Some(certificates), None)
    }

    fn start_with(
        dir: &Path,
        tls: Option<&Certificates>,
        user: Option<(&str, &str)>,
    ) -> Result<Option<Mosquitto>> {
        if !installed("mosquitto", "-h") {
            return Ok(None);
        }
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data)?;
        let access = match user {
            None => "allow_anonymous true\n".to_owned(),
            Some((user, password)) => {
                let file = dir.join("mosquitto.passwd");
                let made = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([user, password])
                    .output()?;
                if !made.status.success() {
                    return Err("mosquitto_passwd failed".into());
                }
                format!("allow_anonymous false\npassword_file {}\n", file.display())
            }
        };
        on_a_free_port(|port| {
            std::fs::write(
                dir.join("mosquitto.conf"),
                format!(
                    "listener {port} 127.0.0.1\npersistence true\n\
                     # Without it, a burst of PUBACKs waits on the client's delayed\n\
                     # ACKs (about 40 ms each time).\n\
                     set_tcp_nodelay true\n\
                     persistence_location {}/\nmax_queued_messages 100000\n\
                     # Started as root, mosquitto would switch to its own user,\n\
                     # which cannot write here: its saved state would be lost.\n\
                     user root\n",
                    data.display()
                ) + &tls
                    .map(|c| {
                        format!(
                            "certfile {}\nkeyfile {}\n",
                            c.cert.display(),
                            c.key.display()
                        )
                    })
                    .unwrap_or_default()
                    + &access,
            )?;
            let mut broker = Mosquitto {
                child: None,
                port,
                dir: dir.to_owned(),
            };
            broker.up()?;
            Ok(Some(broker))
        })
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) -> Result {
        let mut command = Command::new("mosquitto");
        command.arg("-c").arg(self.dir.join("mosquitto.conf"));
        self.child = Some(listening(&mut command, self.port)?);
        Ok(())
    }

    /// SIGTERM: the broker saves its state and stops.
    pub fn down(&mut self) -> Result {
        terminate(self.child.take())
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

/// A CA, a server certificate it signed for `localhost` and 127.0.0.1,
/// and another CA that signed nothing here, made with `openssl`.
#[derive(Clone, Debug)]
pub struct Certificates {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub other_ca: PathBuf,
}

impl Certificates {
    pub fn make(dir: &Path) -> Result<Certificates> {
        let run = |args: &[&str]| -> Result {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            if !out.status.success() {
                return Err(
                    format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            Ok(())
        };
        let ca = |name: &str, cn: &str| -> Result {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ])
        };
        ca("ca", "outbox test CA")?;
        ca("other", "another CA")?;
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ])?;
        Ok(Certificates {
            ca: dir.join("ca.crt"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            other_ca: dir.join("other.crt"),
        })
    }
}
