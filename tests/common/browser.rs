//! A real headless Chromium, driven over WebDriver by ChromeDriver (both
//! from the distribution's packages), and the dashboard under test.
//!
//! The WebDriver client is the handful of W3C commands these tests use,
//! sent with `ureq`: the maintained Rust clients are async and would bring
//! a runtime into the tests for eight requests.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cli::BIN;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Chromium and ChromeDriver are, or `None` (with a line saying so)
/// when they are missing outside CI. In CI (`CI=true`) a missing browser
/// fails the test.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        })
    };
    let found =
        find(&["chromium", "chromium-browser", "google-chrome"]).zip(find(&["chromedriver"]));
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium and chromedriver are required in CI (apt-get install chromium chromium-driver)"
        );
        eprintln!("SKIPPED: chromium and chromedriver not installed");
    }
    found
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `outbox --db DB ui ARGS...` on a free loopback port, and its URL.
pub struct Dashboard {
    child: Child,
    pub url: String,
}

impl Dashboard {
    pub fn start(db: &Path, args: &[&str]) -> Result<Dashboard> {
        Dashboard::start_with_env(db, args, &[])
    }

    pub fn start_with_env(db: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Dashboard> {
        let mut cmd = Command::new(BIN);
        cmd.arg("--db").arg(db).arg("ui");
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env_remove("OUTBOX_UI_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .ok_or_else(|| format!("no URL in {line:?}"))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Dashboard { child, url })
    }
}

impl Dashboard {
    /// The dashboard's process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP client that keeps the dashboard's session cookie, as a
/// browser would; it follows no redirects.
pub struct Visitor {
    agent: ureq::Agent,
    pub cookie: std::cell::RefCell<Option<String>>,
}

impl Default for Visitor {
    fn default() -> Self {
        Visitor::with(ureq::AgentBuilder::new())
    }
}

impl Visitor {
    pub fn with(builder: ureq::AgentBuilder) -> Visitor {
        Visitor {
            agent: builder.redirects(0).build(),
            cookie: std::cell::RefCell::new(None),
        }
    }

    fn keep(&self, r: &ureq::Response) {
        if let Some(c) = r.header("Set-Cookie") {
            *self.cookie.borrow_mut() = c.split(';').next().map(str::to_owned);
        }
    }

    fn send(&self, rq: ureq::Request, form: Option<&[(&str, &str)]>) -> Result<ureq::Response> {
        let rq = match self.cookie.borrow().as_deref() {
            Some(c) => rq.set("Cookie", c),
            None => rq,
        };
        let sent = match form {
            Some(form) => rq.send_form(form),
            None => rq.call(),
        };
        let r = match sent {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        self.keep(&r);
        Ok(r)
    }

    /// GET: the status, the body and the Content-Security-Policy.
    pub fn get(&self, url: &str) -> Result<(u16, String, Option<String>)> {
        let r = self.send(self.agent.get(url), None)?;
        let csp = r.header("Content-Security-Policy").map(str::to_owned);
        Ok((r.status(), r.into_string()?, csp))
    }

    /// POST a form with an `Origin` (or none): the status and the
    /// response, for its headers.
    pub fn post(
        &self,
        url: &str,
        origin: Option<&str>,
        form: &[(&str, &str)],
    ) -> Result<ureq::Response> {
        let mut rq = self.agent.post(url);
        if let Some(o) = origin {
            rq = rq.set("Origin", o);
        }
        self.send(rq, Some(form))
    }
}

/// The form token in a page.
pub fn csrf_of(html: &str) -> Result<String> {
    let at = html.find("name=\"csrf\" value=\"").ok_or("no form token")? + 19;
    Ok(html
        .get(at..at + 32)
        .ok_or("a short form token")?
        .to_owned())
}

/// A ChromeDriver process and one browser session.
pub struct Browser {
    driver: Child,
    base: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start(chromium: &Path, chromedriver: &Path) -> Result<Browser> {
        let port = free_port()?;
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(&format!("{}/status", browser.base))
            .call()
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("chromedriver did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!(
            "--user-data-dir={}",
            browser._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}
        }}});
        let session = browser.call("POST", "/session", Some(caps))?;
        let id = session["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session: {session}"))?;
        browser.base = format!("{}/session/{id}", browser.base);
        Ok(browser)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let rq = ureq::request(method, &url).timeout(Duration::from_secs(60));
        let res = match body {
            Some(b) => rq.send_json(b),
            None => rq.call(),
        };
        let value: Value = match res {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(_, r)) => {
                let v: Value = r.into_json()?;
                return Err(format!("{method} {path}: {}", v["value"]).into());
            }
            Err(e) => return Err(e.into()),
        };
        Ok(value["value"].clone())
    }

    pub fn go(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    pub fn url(&self) -> Result<String> {
        Ok(self
            .call("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn title(&self) -> Result<String> {
        Ok(self
            .call("GET", "/title", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn source(&self) -> Result<String> {
        Ok(self
            .call("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The elements matching a CSS selector.
    pub fn all(&self, css: &str) -> Result<Vec<String>> {
        let found = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The first element matching `css`.
    pub fn find(&self, css: &str) -> Result<String> {
        self.all(css)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("no element matches {css}").into())
    }

    pub fn text(&self, css: &str) -> Result<String> {
        let e = self.find(css)?;
        Ok(self
            .call("GET", &format!("/element/{e}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css)?;
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})))?;
        Ok(())
    }

    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )?;
        Ok(())
    }

    /// Runs `script` in the page (WebDriver's own channel, not the page's
    /// policy) and returns what it returns.
    pub fn run(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits up to `secs` for `check` to hold.
    pub fn wait_for(
        &self,
        secs: u64,
        what: &str,
        mut check: impl FnMut(&Browser) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if check(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.base).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
