//! Child processes of the testbed: started with their output in a log file,
//! killed when dropped, and killed by the kernel when the thread that
//! started them dies (so a test binary that exits never leaves a control
//! plane behind, even though statics are never dropped).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `bin` with `args`, stdout and stderr going to `<dir>/<name>.log`.
    ///
    /// The child gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies with the thread
    /// that spawned it. Spawn long-lived processes from a thread that lives as
    /// long as they should.
    pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> Result<Proc> {
        Self::spawn_with_env(name, bin, args, &[], dir)
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        dir: &Path,
    ) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .current_dir(dir);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may already be gone between fork and prctl.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {name} ({})", bin.display()))?;
        Ok(Proc { name: name.to_string(), log, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the process's log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Polls `ready` until it returns true, failing with the tail of the log
    /// when the process exits or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited with {status} before it was ready; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(30)
                );
            }
            if ready() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} was not ready after {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests
/// that start their servers right away).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain-HTTP GET of `path` on 127.0.0.1:`port`: the whole answer
/// (status line, headers, body), or None when nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_at("127.0.0.1", port, path)
}

/// [`http_get`] on `host` (an address) instead of 127.0.0.1.
pub fn http_get_at(host: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).ok()?;
    let mut buf = String::new();
    let _ = stream.read_to_string(&mut buf);
    Some(buf)
}

/// The body of [`http_get`]'s answer (empty when nothing answered).
pub fn http_body(port: u16, path: &str) -> String {
    http_body_at("127.0.0.1", port, path)
}

/// [`http_body`] on `host` instead of 127.0.0.1.
pub fn http_body_at(host: &str, port: u16, path: &str) -> String {
    http_get_at(host, port, path)
        .and_then(|a| a.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))
        .unwrap_or_default()
}

/// True when a plain-HTTP GET of `path` on 127.0.0.1:`port` answers 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    http_ok_at("127.0.0.1", port, path)
}

/// [`http_ok`] on `host` instead of 127.0.0.1.
pub fn http_ok_at(host: &str, port: u16, path: &str) -> bool {
    http_get_at(host, port, path)
        .is_some_and(|a| a.starts_with("HTTP/1.0 200") || a.starts_with("HTTP/1.1 200"))
}

/// One TCP socket a process holds, as `/proc/net/tcp{,6}` shows it (what
/// `ss -tno` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub established: bool,
    /// The kernel timer pending on the socket: 0 none, 1 retransmission,
    /// 2 keepalive, 3 TIME_WAIT, 4 zero-window probe.
    pub timer: u8,
    /// When that timer fires.
    pub timer_in: std::time::Duration,
    pub inode: u64,
}

/// The TCP sockets process `pid` holds (`/proc/net/tcp{,6}` joined with the
/// process's open files).
pub fn tcp_sockets(pid: u32) -> Vec<TcpSocket> {
    let mine: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:tm->when retrnsmt uid timeout inode
            let (Some(local), Some(remote), Some(state), Some(timer), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(5), f.get(9))
            else {
                continue;
            };
            let Some(inode) = inode.parse::<u64>().ok().filter(|i| mine.contains(i)) else { continue };
            let (Some(local_port), Some(remote_port)) = (port(local), port(remote)) else { continue };
            let (kind, when) = timer.split_once(':').unwrap_or(("0", "0"));
            sockets.push(TcpSocket {
                local_port,
                remote_port,
                established: *state == "01",
                timer: u8::from_str_radix(kind, 16).unwrap_or(0),
                timer_in: std::time::Duration::from_millis(
                    u64::from_str_radix(when, 16).unwrap_or(0) * 1000 / ticks,
                ),
                inode,
            });
        }
    }
    sockets
}

/// The established TCP connections that process `pid` holds to `port` on
/// this host, by socket inode.
pub fn connections_to(pid: u32, port: u16) -> std::collections::BTreeSet<u64> {
    tcp_sockets(pid).into_iter().filter(|s| s.established && s.remote_port == port).map(|s| s.inode).collect()
}

/// Sets process `pid`'s soft limit on open file descriptors (its hard limit
/// stays) and returns the soft limit it had.
/// Sends `signal` (`libc::SIGTERM`, `SIGSTOP`, `SIGCONT`…) to `pid`: no
/// `kill` binary needed (a fresh machine may lack procps).
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn set_open_files_limit(pid: u32, soft: u64) -> std::io::Result<u64> {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit reads and writes only the two rlimit structs passed,
    // both valid for the call.
    #[allow(unsafe_code)]
    let read = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    if read != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = libc::rlimit { rlim_cur: soft.min(old.rlim_max), rlim_max: old.rlim_max };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let set = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// CPU time process `pid` has used, user and system.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: utime and
    // stime (in clock ticks) are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // SAFETY: sysconf only reads a constant.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match (field(11), field(12), u64::try_from(per_second)) {
        (Some(u), Some(s), Ok(hz)) if hz > 0 => Ok(Duration::from_secs_f64((u + s) as f64 / hz as f64)),
        _ => Err(std::io::Error::other(format!("unreadable /proc/{pid}/stat"))),
    }
}

/// Resident memory of process `pid`, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The highest resident memory of a process, sampled (every 250 ms unless
/// told otherwise) on a thread of its own until dropped.
pub struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PeakRss {
    pub fn start(pid: u32) -> PeakRss {
        Self::every(pid, Duration::from_millis(250))
    }

    /// Sampled every `interval` (short spikes need a short one).
    pub fn every(pid: u32, interval: Duration) -> PeakRss {
        use std::sync::atomic::Ordering::Relaxed;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Relaxed) {
                p.fetch_max(rss_kib(pid), Relaxed);
                std::thread::sleep(interval);
            }
        });
        PeakRss { peak, stop }
    }

    /// The peak so far, in KiB.
    pub fn kib(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
