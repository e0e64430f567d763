//! A service binary of this workspace as a child process, as it is deployed.
//!
//! A service binds the addresses its flags name (`--admin-addr`, `--grpc-addr`, …), so the test
//! picks them: each is a port the kernel handed out a moment before (bound to port 0, then
//! released). That is a race: another process may take the port first. The service then logs
//! `Address already in use` and never becomes ready, and [`ServiceProcess::start`] stops it
//! and starts it again on fresh ports. Ready means `/readyz` answers 200 *and* the process
//! itself holds a listening socket on each of its ports (read from `/proc` on Linux), so an
//! answer from whoever took the admin port is not taken for the service's.
use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Starts on fresh ports after a lost port race, at most this many in all.
const ATTEMPTS: usize = 5;
/// The admin server's flag (`/healthz`, `/readyz`, `/metrics`), which every service has.
const ADMIN: &str = "--admin-addr";
/// What a service logs when a port it was given is taken (the OS's text for EADDRINUSE).
const ADDR_IN_USE: &str = "Address already in use";

/// The path of a workspace binary built into the same target folder as the running test (or
/// as the running binary, for a workspace binary that starts the others).
pub fn service_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the running binary has no folder")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>; target/<profile>/<bin> → the same.
    let dir = if dir.ends_with("deps") { dir.parent().context("test binary has no target dir")? } else { dir };
    let bin = dir.join(name);
    if !bin.exists() {
        bail!("{} is not built: run `cargo build --bins` (the test suite script does)", bin.display());
    }
    Ok(bin)
}

/// How to start a service, for [`ServiceProcess::start_with`]; [`ServiceProcess::start`] takes
/// the defaults.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// The binary (default: [`service_binary`] of the service's name).
    pub program: Option<PathBuf>,
    /// The log file, appended to across restarts (default: a fresh temp file per start).
    pub log: Option<PathBuf>,
    /// Environment variables besides the log filter.
    pub env: Vec<(String, String)>,
}

/// A running service: its name, its flags, the addresses it listens on, its log.
pub struct ServiceProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    /// Every flag that takes a listen address, the admin server's first.
    listen: Vec<String>,
    /// The address each of those flags got at the last start.
    addrs: BTreeMap<String, SocketAddr>,
    child: Option<Child>,
    log: PathBuf,
    /// Where this start's part of the log begins (a kept log holds earlier starts' too).
    log_start: u64,
    /// Whether the log is kept across starts (appended to) rather than made per start.
    keep_log: bool,
    env: Vec<(String, String)>,
    exited: Option<ExitStatus>,
}

/// How one start went.
enum Started {
    Ready,
    /// A port was taken before the service bound it: worth another start on fresh ports.
    PortTaken,
}

impl ServiceProcess {
    /// Starts `name` with `args` and waits until it is ready, at most `ready` per start.
    /// `listen` names the flags that take a listen address (say `--grpc-addr`); each of them,
    /// and `--admin-addr`, gets a loopback address of its own, read back with [`Self::addr`].
    /// Logs go to a temp file ([`Self::logs`]), printed when a test panics.
    pub async fn start(name: &str, args: &[String], listen: &[&str], ready: Duration) -> anyhow::Result<Self> {
        Self::start_with(name, args, listen, ready, ServiceOptions::default()).await
    }

    /// [`Self::start`] with a binary, a kept log file or environment of the caller's choosing.
    pub async fn start_with(
        name: &str,
        args: &[String],
        listen: &[&str],
        ready: Duration,
        options: ServiceOptions,
    ) -> anyhow::Result<Self> {
        let program = match options.program {
            Some(program) => program,
            None => service_binary(name)?,
        };
        let keep_log = options.log.is_some();
        let mut process = Self {
            name: name.to_owned(),
            program,
            args: args.to_vec(),
            listen: std::iter::once(ADMIN).chain(listen.iter().copied()).map(str::to_owned).collect(),
            addrs: BTreeMap::new(),
            child: None,
            log: options.log.unwrap_or_default(),
            log_start: 0,
            keep_log,
            env: options.env,
            exited: None,
        };
        process.launch(ready, &mut candidate_addrs).await?;
        Ok(process)
    }

    /// Stops the service (SIGKILL, if it still runs) and starts it again with `args`, the same
    /// listen flags, on fresh ports.
    pub async fn restart(&mut self, args: Vec<String>, ready: Duration) -> anyhow::Result<()> {
        self.kill();
        self.args = args;
        self.launch(ready, &mut candidate_addrs).await
    }

    /// Stops the service (SIGKILL, if it still runs) and starts it again with the same flags on
    /// the same addresses, so whoever was given them finds it there again. Should one of them be
    /// taken meanwhile it starts on fresh ones: returns whether its addresses changed.
    pub async fn restart_in_place(&mut self, ready: Duration) -> anyhow::Result<bool> {
        self.kill();
        let before = self.addrs.clone();
        let old: Vec<SocketAddr> = self.listen.iter().map(|flag| before[flag]).collect();
        let mut first = true;
        let mut pick = |n: usize| {
            if std::mem::take(&mut first) { old.clone() } else { candidate_addrs(n) }
        };
        self.launch(ready, &mut pick).await?;
        Ok(self.addrs != before)
    }

    /// Whether the process runs (it has not exited, whatever signal it was sent).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                (self.child, self.exited) = (None, Some(status));
                false
            }
            _ => false,
        }
    }

    /// SIGSTOP: the process stays, doing nothing, until [`Self::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Starts the process on addresses from `pick` until it is ready, again on fresh ones after a
    /// lost port race.
    async fn launch(&mut self, ready: Duration, pick: &mut dyn FnMut(usize) -> Vec<SocketAddr>) -> anyhow::Result<()> {
        for attempt in 1..=ATTEMPTS {
            self.addrs = self.listen.iter().cloned().zip(pick(self.listen.len())).collect();
            self.spawn()?;
            match self.wait_started(ready).await? {
                Started::Ready => return Ok(()),
                Started::PortTaken => {
                    eprintln!(
                        "{}: a port among {:?} was taken before it bound it (attempt {attempt} of {ATTEMPTS}); \
                         starting it again on fresh ports",
                        self.name, self.addrs
                    );
                    self.kill();
                }
            }
        }
        bail!("{} lost the race for its ports {ATTEMPTS} times; its last log:\n{}", self.name, self.logs())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let out = if self.keep_log {
            let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
            use std::io::Write as _;
            writeln!(out, "=== {} started with {:?} ===", self.name, self.addrs)?;
            out
        } else {
            self.log = std::env::temp_dir().join(format!("millrace-{}-{}.log", self.name, self.admin().port()));
            std::fs::File::create(&self.log)?
        };
        self.log_start = out.metadata()?.len();
        let child = Command::new(&self.program)
            .args(&self.args)
            .args(self.addrs.iter().map(|(flag, addr)| format!("{flag}={addr}")))
            .env("MILLRACE_LOG", "info,ort=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        (self.child, self.exited) = (Some(child), None);
        Ok(())
    }

    /// Until `/readyz` answers 200 from this process, the service reports a taken port, it
    /// exits, or `timeout` passes.
    async fn wait_started(&mut self, timeout: Duration) -> anyhow::Result<Started> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let readyz = format!("http://{}/readyz", self.admin());
        let deadline = Instant::now() + timeout;
        loop {
            if self.this_start_logs().contains(ADDR_IN_USE) {
                return Ok(Started::PortTaken);
            }
            let child = self.child.as_mut().context("never started")?;
            if let Some(status) = child.try_wait()? {
                (self.child, self.exited) = (None, Some(status));
                if self.this_start_logs().contains(ADDR_IN_USE) {
                    return Ok(Started::PortTaken);
                }
                bail!("{} exited ({status}) before it was ready; its log:\n{}", self.name, self.logs());
            }
            let answered = matches!(client.get(&readyz).send().await, Ok(r) if r.status().is_success());
            if answered && self.holds_its_ports() {
                return Ok(Started::Ready);
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {timeout:?}; its log:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether this process listens on every one of its ports (true where `/proc` cannot tell).
    fn holds_its_ports(&self) -> bool {
        let Some(pid) = self.pid() else { return false };
        match listening_ports(pid) {
            Some(ports) => self.addrs.values().all(|addr| ports.contains(&addr.port())),
            None => true,
        }
    }

    /// The address the service got for `flag` (one of the `listen` flags it was started with).
    pub fn addr(&self, flag: &str) -> SocketAddr {
        *self
            .addrs
            .get(flag)
            .unwrap_or_else(|| panic!("{} was not started with {flag} among its listen flags", self.name))
    }

    /// The admin server: `/healthz`, `/readyz`, `/metrics`.
    pub fn admin(&self) -> SocketAddr {
        self.addr(ADMIN)
    }

    /// The service's Prometheus metrics text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        crate::metrics::scrape(self.admin()).await
    }

    /// The flags it was started with, listen addresses aside.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// What the service logged (with a kept log, every start's).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the service logged since its latest start.
    fn this_start_logs(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(self.log_start as usize..).unwrap_or_default()).into_owned()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit by itself (at once if it already has).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("never started")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}; its log:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no draining, no flushing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.logs());
        }
    }
}

/// `n` distinct loopback addresses whose ports were free a moment ago: each bound to port 0,
/// all released together. Not reserved: only [`ServiceProcess`] uses them, and it checks that
/// the service really holds each one and starts again on fresh ones when it does not.
fn candidate_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("a bound listener's address")).collect()
}

/// The TCP ports process `pid` listens on, from `/proc`; `None` where `/proc` cannot tell.
fn listening_ports(pid: u32) -> Option<HashSet<u16>> {
    let sockets: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    let mut ports = HashSet::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        read_any = true;
        // sl local_address rem_address st … inode: the local address is HEXIP:HEXPORT, state
        // 0A is LISTEN, the inode is the tenth column.
        for columns in text.lines().skip(1).map(|l| l.split_whitespace().collect::<Vec<_>>()) {
            let (Some(local), Some(&"0A"), Some(inode)) = (columns.get(1), columns.get(3), columns.get(9)) else {
                continue;
            };
            let port = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(inode)) = (port, inode.parse::<u64>())
                && sockets.contains(&inode)
            {
                ports.insert(port);
            }
        }
    }
    read_any.then_some(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_is_seen_to_hold_its_listening_ports_and_no_others() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ports = listening_ports(std::process::id()).expect("/proc/net/tcp");
        assert!(ports.contains(&port), "{port} not in {ports:?}");
        drop(listener);
        assert!(!listening_ports(std::process::id()).unwrap().contains(&port));
        assert_eq!(candidate_addrs(3).into_iter().collect::<HashSet<_>>().len(), 3);
    }

    /// A stand-in service: answers `/readyz` on its `--admin-addr`, or logs the bind error and
    /// stays up unready, as a supervised service whose admin child cannot bind does.
    const FAKE_SERVICE: &str = r#"
import http.server, sys, time
addr = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--admin-addr=")][0]
host, port = addr.rsplit(":", 1)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"the fake service")
    def log_message(self, *args):
        pass
try:
    server = http.server.HTTPServer((host, int(port)), Ready)
except OSError as e:
    print(f"admin: bind {addr}: {e}", flush=True)
    time.sleep(60)
    sys.exit(1)
server.serve_forever()
"#;

    fn fake(log: Option<PathBuf>) -> ServiceProcess {
        ServiceProcess {
            name: "fake".into(),
            program: "python3".into(),
            args: vec!["-c".into(), FAKE_SERVICE.into()],
            listen: vec![ADMIN.into()],
            addrs: BTreeMap::new(),
            child: None,
            keep_log: log.is_some(),
            log: log.unwrap_or_default(),
            log_start: 0,
            env: Vec::new(),
            exited: None,
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_killed_service_restarts_in_place_and_its_kept_log_holds_both_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut process = fake(Some(dir.path().join("fake.log")));
        process.launch(Duration::from_secs(20), &mut candidate_addrs).await.unwrap();
        let (admin, pid) = (process.admin(), process.pid());
        process.pause();
        assert!(process.running(), "a stopped process still runs");
        process.resume();
        process.kill();
        assert!(!process.running());
        assert!(!process.restart_in_place(Duration::from_secs(20)).await.unwrap(), "the same addresses");
        assert_eq!(process.admin(), admin);
        assert_ne!(process.pid(), pid);
        assert_eq!(process.logs().matches("=== fake started").count(), 2);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_service_whose_old_port_was_taken_restarts_on_a_fresh_one() {
        let mut process = fake(None);
        process.launch(Duration::from_secs(20), &mut candidate_addrs).await.unwrap();
        let admin = process.admin();
        process.kill();
        // Someone else takes the port while the service is down.
        let squatter = std::net::TcpListener::bind(admin).unwrap();
        assert!(process.restart_in_place(Duration::from_secs(20)).await.unwrap(), "fresh addresses");
        assert_ne!(process.admin(), admin);
        drop(squatter);
    }

    /// Linux: elsewhere nothing tells the squatter's answer from the service's.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_service_that_lost_its_port_is_started_again_on_a_fresh_one() {
        // Someone else holds the first port the service is given, and answers on it.
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken_addr = taken.local_addr().unwrap();
        let squatter = tokio::spawn(async move {
            loop {
                let (mut socket, _) = taken.accept().await.unwrap();
                use tokio::io::AsyncWriteExt;
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        let mut process = fake(None);
        let mut picks = 0;
        let mut pick = |n| {
            picks += 1;
            if picks == 1 { vec![taken_addr] } else { candidate_addrs(n) }
        };
        process.launch(Duration::from_secs(20), &mut pick).await.unwrap();
        assert_eq!(picks, 2, "one lost race, one fresh start");
        assert_ne!(process.admin(), taken_addr);
        let body = reqwest::get(format!("http://{}/readyz", process.admin())).await.unwrap().text().await.unwrap();
        assert_eq!(body, "the fake service");
        squatter.abort();
    }
}
