//! One thread that lives as long as the test process and starts every
//! testbed child. `PR_SET_PDEATHSIG` fires when the *thread* that forked a
//! child exits; Rust tests each run on their own short-lived thread (and
//! tokio's blocking threads come and go), so children are forked here.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

use anyhow::{Result, anyhow};

use crate::process::Proc;

struct Request {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    reply: Sender<Result<Proc>>,
}

fn sender() -> Result<Sender<Request>> {
    static TX: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                for req in rx {
                    let _ = req
                        .reply
                        .send(Proc::spawn_with_env(&req.name, &req.bin, &req.args, &req.env, &req.dir));
                }
                // The sender lives in a static and is never dropped, so this
                // thread (and the children's death signal) lasts as long as the process.
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or(());
        Mutex::new(tx)
    });
    Ok(crate::lock(tx).clone())
}

/// Starts a process from the spawner thread; see [`Proc::spawn`].
pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> Result<Proc> {
    spawn_with_env(name, bin, args, &[], dir)
}

/// [`spawn`] with extra environment variables.
pub fn spawn_with_env(
    name: &str,
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
) -> Result<Proc> {
    let (reply, rx) = channel();
    sender()?
        .send(Request {
            name: name.into(),
            bin: bin.into(),
            args: args.to_vec(),
            env: env.to_vec(),
            dir: dir.into(),
            reply,
        })
        .map_err(|_| anyhow!("testbed spawner thread is gone"))?;
    rx.recv().map_err(|_| anyhow!("testbed spawner thread is gone"))?
}
