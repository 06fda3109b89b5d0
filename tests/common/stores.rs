//! Private Redis and PostgreSQL servers for the tests, on free loopback ports, stopped by their PID. The binaries
//! come from Debian's `redis-server` and `postgresql` (scripts/test.sh installs them when missing).

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{within, TempDir};

fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn wait_port(port: u16) {
    within(async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A redis-server on a free port; `stop` and `start` keep the port, to test an outage.
pub struct Redis {
    pub port: u16,
    pub url: String,
    dir: TempDir,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Redis {
        let port = free_port();
        let mut r = Redis {
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir: TempDir::new("redis"),
            child: None,
        };
        r.restart().await;
        r
    }

    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server, or run scripts/test.sh)");
        self.child = Some(child);
        wait_port(self.port).await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli -p PORT args...`, returning stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL 15 cluster on a free port, run as the `postgres` OS user (initdb refuses root).
pub struct Postgres {
    pub dsn: String,
    data: PathBuf,
    _dir: TempDir,
}

fn as_postgres(cmd: &str) -> bool {
    Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Postgres {
    pub async fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL (apt-get install postgresql, or run scripts/test.sh)")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .max()
            .expect("a PostgreSQL version");
        let dir = TempDir::new("pg");
        let data = dir.0.join("data");
        let pwfile = dir.0.join("pw");
        std::fs::write(&pwfile, "test-password\n").expect("pw");
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir.0)
            .status();
        let _ = Command::new("chmod").args(["755"]).arg(&dir.0).status();
        let port = free_port();
        let init = format!(
            "{}/initdb -D {} -A md5 --username=postgres --pwfile={} >/dev/null",
            bin.display(),
            data.display(),
            pwfile.display()
        );
        assert!(as_postgres(&init), "initdb failed");
        let start = format!(
            "{}/pg_ctl -D {d} -l {d}/log -w start -o '-p {port} -k {d} -c listen_addresses=127.0.0.1'",
            bin.display(),
            d = data.display()
        );
        assert!(as_postgres(&start), "pg_ctl start failed");
        wait_port(port).await;
        Postgres {
            dsn: format!(
                "postgres://postgres:test-password@127.0.0.1:{port}/postgres?sslmode=disable"
            ),
            data,
            _dir: dir,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).max());
        if let Some(bin) = bin {
            as_postgres(&format!(
                "{}/pg_ctl -D {} -m immediate stop",
                bin.display(),
                self.data.display()
            ));
        }
    }
}
