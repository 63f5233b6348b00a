//! A real nginx (Debian's package) on a free loopback port in front of gateway instances,
//! running the shipped `deploy/nginx.conf` with only its `listen` and upstream `server`
//! addresses replaced. Its prefix (config, pid, logs, temp dirs) is a temporary directory;
//! it is stopped when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long nginx may take to accept connections after it was spawned.
const READY_WAIT: Duration = Duration::from_secs(10);

/// The operators' file, as shipped.
pub const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf");

pub struct Nginx {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// Starts nginx balancing over `instances`; fails the test, saying what to install, when
    /// nginx is missing.
    pub async fn start(instances: &[SocketAddr]) -> Nginx {
        let bin = nginx_binary();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers run as `nobody` when it starts as root: they must reach the prefix.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let shipped = std::fs::read_to_string(SHIPPED_CONFIG).unwrap();
        let site = render(&shipped, addr, instances);
        std::fs::write(dir.path().join("muxgate.conf"), site).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING}"),
            Err(e) => panic!("cannot start {}: {e}", bin.display()),
        };
        let mut nginx = Nginx { addr, dir, child };
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut e) = nginx.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                panic!(
                    "nginx exited ({status}) before listening on {addr}: {stderr}\n{}",
                    nginx.error_log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen on {addr} within {READY_WAIT:?}: {}",
                nginx.error_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// nginx's error log so far, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Every access log line so far: `$upstream_addr $status $request`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them, still listening).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MISSING: &str = "nginx is missing: the deployment tests run the shipped deploy/nginx.conf \
    in a real nginx; install Debian's `nginx` package (apt-get install nginx), or set NGINX to \
    its path";

/// `$NGINX`, else `nginx` on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH).
fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let debian = PathBuf::from("/usr/sbin/nginx");
        assert!(debian.is_file(), "{MISSING}");
        debian
    })
}

/// The main config around the shipped site file: everything in `prefix`, in the foreground.
fn main_config(prefix: &Path) -> String {
    let p = prefix.display();
    format!(
        "daemon off;\n\
         worker_processes 1;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   log_format upstream '$upstream_addr $status $request';\n\
         \x20   access_log {p}/access.log upstream;\n\
         \x20   client_body_temp_path {p}/client_body;\n\
         \x20   proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n\
         \x20   uwsgi_temp_path {p}/uwsgi;\n\
         \x20   scgi_temp_path {p}/scgi;\n\
         \x20   include {p}/muxgate.conf;\n\
         }}\n"
    )
}

/// The shipped site file with `listen` set to `listen` and the upstream's `server` lines
/// replaced by one per instance, each keeping the parameters the first one had
/// (`max_fails`). Fails the test if the file no longer has that shape.
pub fn render(shipped: &str, listen: SocketAddr, instances: &[SocketAddr]) -> String {
    let mut out = String::new();
    let (mut in_upstream, mut listens, mut servers_written) = (false, 0, false);
    for line in shipped.lines() {
        let code = line.trim();
        if code.starts_with("upstream muxgate {") {
            in_upstream = true;
        } else if in_upstream && code == "}" {
            in_upstream = false;
        } else if in_upstream && code.starts_with("server ") {
            if !servers_written {
                let params = code
                    .trim_end_matches(';')
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                for instance in instances {
                    out.push_str(&format!("    server {instance} {params};\n"));
                }
                servers_written = true;
            }
            continue;
        } else if code.starts_with("listen ") {
            listens += 1;
            out.push_str(&format!("    listen {listen};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        servers_written && listens == 1,
        "{SHIPPED_CONFIG} no longer has one `listen` and `server` lines in `upstream muxgate`"
    );
    out
}
