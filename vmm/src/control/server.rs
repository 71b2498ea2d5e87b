//! The control socket's server: a Unix socket (mode 0600) that greets each
//! client, answers its requests in order and streams events to it.
//! One reader and one writer thread per client; a bounded queue between
//! the VM and each writer, so a slow or stuck client loses events but never
//! holds up a vCPU.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::stream::{Framer, Item};
use super::{lock, protocol, Controller, ServerError};

/// The longest request; a longer one ends the connection.
pub use super::stream::MAX_REQUEST;
/// Clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 16;
/// Lines queued to one client before events to it are dropped.
const CLIENT_QUEUE: usize = 4096;
/// How long a write to a client may block before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the accept loop looks whether the server is stopping.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

struct Client {
    stream: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

/// A listening control socket; removed when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Arc<Mutex<Vec<Client>>>,
    ctl: Arc<Controller>,
    accept: Option<JoinHandle<()>>,
}

/// Makes `path` a fresh socket: a stale socket there is replaced, anything
/// else (a file, a live socket) is left alone and reported.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::Listening(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(ServerError::io(path))?;
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServerError::io(path)(e)),
    }
    // Bound in a private directory, made 0600 and only then moved into
    // place: nobody else can connect in between.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let private = parent.join(format!(".cowlab-control-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(ServerError::io(path))?;
    let tmp = private.join("socket");
    let result = UnixListener::bind(&tmp)
        .map_err(ServerError::io(path))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(ServerError::io(path))?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

impl Server {
    /// Listens at `path` for clients of `ctl`.
    pub fn start(path: &Path, ctl: Arc<Controller>) -> Result<Server, ServerError> {
        let listener = bind(path)?;
        listener
            .set_nonblocking(true)
            .map_err(ServerError::io(path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, clients, ctl) = (Arc::clone(&stop), Arc::clone(&clients), Arc::clone(&ctl));
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(&listener, &stop, &clients, &ctl))
                .map_err(ServerError::Thread)?
        };
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            clients,
            ctl,
            accept: Some(accept),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Readers see end of input; writers drain what is queued (the
        // final events) and close.
        lock(&self.ctl.clients).clear();
        let clients = std::mem::take(&mut *lock(&self.clients));
        for c in &clients {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        for c in clients {
            for t in c.threads {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    clients: &Mutex<Vec<Client>>,
    ctl: &Arc<Controller>,
) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let mut list = lock(clients);
                list.retain(|c| !c.threads.iter().all(|t| t.is_finished()));
                if list.len() >= MAX_CLIENTS {
                    drop(list);
                    refuse(stream);
                    continue;
                }
                if let Some(client) = serve(stream, ctl) {
                    list.push(client);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn refuse(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let line = serde_json::json!({
        "error": { "class": "GenericError", "desc": format!("too many clients (at most {MAX_CLIENTS})") }
    });
    let _ = writeln!(stream, "{line}");
}

/// Starts the reader and writer of a new client.
fn serve(stream: UnixStream, ctl: &Arc<Controller>) -> Option<Client> {
    stream.set_nonblocking(false).ok()?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
    let (tx, rx) = sync_channel::<String>(CLIENT_QUEUE);
    tx.try_send(protocol::greeting().to_string()).ok()?;
    let writer_stream = stream.try_clone().ok()?;
    let reader_stream = stream.try_clone().ok()?;
    let writer = std::thread::Builder::new()
        .name("control-out".into())
        .spawn(move || write_loop(writer_stream, rx))
        .ok()?;
    ctl.add_client(tx.clone());
    let ctl = Arc::clone(ctl);
    let reader = std::thread::Builder::new()
        .name("control-in".into())
        .spawn(move || {
            read_loop(reader_stream, &ctl, &tx);
            let _ = tx.send(CLOSE.to_string());
        })
        .ok()?;
    Some(Client {
        stream,
        threads: vec![reader, writer],
    })
}

/// Queued by the reader when it is done: the writer closes the connection
/// once everything before it is written.
const CLOSE: &str = "";

fn write_loop(mut stream: UnixStream, rx: Receiver<String>) {
    for line in rx {
        if line == CLOSE {
            break;
        }
        if stream
            .write_all(line.as_bytes())
            .and_then(|()| stream.write_all(b"\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Answers each request in turn, however the client splits or joins them
/// (a newline after each is optional: [`stream`]); ends on end of input,
/// an over-long request or a client that no longer reads.
fn read_loop(mut stream: UnixStream, ctl: &Controller, tx: &std::sync::mpsc::SyncSender<String>) {
    let mut framer = Framer::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            // End of input in the middle of a value: the client went away.
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for item in framer.push(&chunk[..n]) {
            let (response, close) = match item {
                Item::Value(v) => (protocol::respond(ctl, &v), false),
                Item::Error(e) => (protocol::generic(e).response(None), false),
                Item::TooLong => (
                    protocol::generic(format!("request longer than {MAX_REQUEST} bytes; closing"))
                        .response(None),
                    true,
                ),
            };
            if tx.send(response.to_string()).is_err() || close {
                return;
            }
        }
    }
}
