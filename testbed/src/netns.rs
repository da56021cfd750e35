//! A network namespace of the test's own, with nothing in it but a loopback
//! interface, and loopback forwarders in and out of it.
//!
//! The real vcluster listens on fixed ports (its proxy on 8443 — "changing
//! port is currently not supported" says its chart —, its API server on
//! 6443, its controller-manager on 10257): two of them on one machine need
//! one network namespace each. Inside, only loopback exists, so nothing the
//! vcluster dials can leave it but through a forwarder the testbed opened:
//! from a port on its loopback to the same port on the host's (the host API
//! server, dormant's audit webhook), and from a host loopback port to a port
//! inside (its proxy).
//!
//! A thread of the test process owns the namespace: it unshares its network
//! namespace, brings `lo` up, and then creates the sockets that must live
//! inside (a socket belongs to the namespace it was created in, whichever
//! thread uses it later). `nsenter --net=<path>` runs a command inside. The
//! namespace goes away when the thread has ended and nothing else holds it.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

enum Request {
    Listen(u16, Sender<io::Result<TcpListener>>),
    Connect(SocketAddrV4, Sender<io::Result<TcpStream>>),
}

/// A network namespace that lives until dropped.
pub struct NetNs {
    /// `/proc/<pid>/task/<tid>/ns/net`, for `nsenter --net=`.
    pub path: PathBuf,
    requests: Sender<Request>,
}

impl NetNs {
    pub fn new(name: &str) -> Result<NetNs> {
        let (requests, inbox) = channel::<Request>();
        let (ready, is_ready) = channel();
        std::thread::Builder::new().name(format!("netns-{name}")).spawn(move || {
            let entered = enter_new_namespace();
            let failed = entered.is_err();
            let _ = ready.send(entered);
            if failed {
                return;
            }
            for req in inbox {
                match req {
                    Request::Listen(port, reply) => {
                        let _ = reply.send(TcpListener::bind((Ipv4Addr::LOCALHOST, port)));
                    }
                    Request::Connect(addr, reply) => {
                        let _ = reply.send(TcpStream::connect(addr));
                    }
                }
            }
        })?;
        let tid = is_ready
            .recv()
            .map_err(|_| anyhow!("netns thread ended"))?
            .context("a network namespace of our own (needs root: unshare(CLONE_NEWNET))")?;
        Ok(NetNs { path: PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id())), requests })
    }

    /// A listener on 127.0.0.1:`port` inside.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        let (reply, answer) = channel();
        self.requests.send(Request::Listen(port, reply)).map_err(|_| io::Error::other("netns gone"))?;
        answer.recv().map_err(|_| io::Error::other("netns gone"))?
    }

    /// A connection to 127.0.0.1:`port` inside.
    pub fn connect(&self, port: u16) -> io::Result<TcpStream> {
        self.dialer()(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }

    /// A function that connects to `port` inside, for [`forward`].
    pub fn connector(&self, port: u16) -> impl Fn() -> io::Result<TcpStream> + Send + Sync + Clone + 'static {
        let dial = self.dialer();
        move || dial(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }

    /// A function that connects to any address from inside (a pod's IP
    /// that a route makes local there). It keeps the namespace alive.
    pub fn dialer(&self) -> impl Fn(SocketAddrV4) -> io::Result<TcpStream> + Send + Sync + Clone + 'static {
        let requests = self.requests.clone();
        move |addr| {
            let (reply, answer) = channel();
            requests.send(Request::Connect(addr, reply)).map_err(|_| io::Error::other("netns gone"))?;
            answer.recv().map_err(|_| io::Error::other("netns gone"))?
        }
    }

    /// Runs `ip <args>` inside (`route add local 10.244.0.0/16 dev lo`).
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        ip_in(&self.path, args)
    }

    /// The id of the thread that holds it, which `ip … netns <id>` takes.
    pub fn holder_id(&self) -> Result<String> {
        self.path
            .iter()
            .nth_back(2)
            .and_then(|t| t.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no thread id in {}", self.path.display()))
    }
}

/// Runs `ip <args>` inside the network namespace at `path`.
pub fn ip_in(path: &std::path::Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", path.display()))
        .arg("ip")
        .args(args)
        .output()
        .context("run nsenter ip")?;
    if !out.status.success() {
        anyhow::bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path` (a
/// [`NetNs::path`]): every socket it makes from then on lives there. For
/// threads of the test's own (an app server, a client), never for a
/// pooled runtime thread that other work shares.
pub fn enter(path: &std::path::Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(path)?;
    // SAFETY: setns takes a valid descriptor (open above) and changes this
    // thread's network namespace only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unshares this thread's network namespace and brings its loopback up;
/// returns the thread's id.
fn enter_new_namespace() -> io::Result<libc::pid_t> {
    // SAFETY: unshare and gettid take no pointers; the namespace change
    // concerns this thread only.
    #[allow(unsafe_code)]
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    loopback_up()?;
    // SAFETY: as above.
    #[allow(unsafe_code)]
    Ok(unsafe { libc::gettid() })
}

/// `ip link set lo up`, with the two ioctls it amounts to.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket call; the fd is closed below on every path.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ifr` is a zeroed ifreq that lives across both ioctls, which
    // only read and write it; the name fits (IFNAMSIZ is 16).
    #[allow(unsafe_code)]
    let result = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            Err(io::Error::last_os_error())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closes the fd opened above, once.
    #[allow(unsafe_code)]
    unsafe {
        libc::close(fd);
    }
    result
}

/// Accepts on `listener` and forwards each connection, both ways, to a
/// connection `connect` opens. When `connect` fails (nothing listens
/// there), the accepted connection is reset, so the client sees what it
/// would see from a port nothing listens on (ECONNRESET rather than a
/// clean end of stream). Runs until the task is dropped.
pub async fn forward(
    listener: TcpListener,
    connect: impl Fn() -> io::Result<TcpStream> + Send + Sync + Clone + 'static,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (client, _) = listener.accept().await?;
        let connect = connect.clone();
        tokio::spawn(async move {
            let upstream = tokio::task::spawn_blocking(connect).await.map_err(io::Error::other).flatten();
            match upstream.and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(s)
            }) {
                Ok(mut upstream) => {
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(_) => reset(client),
            }
        });
    }
}

/// Closes `stream` with a reset (SO_LINGER 0).
fn reset(stream: tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: sets an option on a socket we own, from a value that lives
    // across the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// Waits until something accepts connections on `port` inside `ns`.
pub async fn wait_listening(ns: &NetNs, port: u16, timeout: Duration) -> bool {
    let connect = ns.connector(port);
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        let c = connect.clone();
        if tokio::task::spawn_blocking(c).await.is_ok_and(|r| r.is_ok()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
