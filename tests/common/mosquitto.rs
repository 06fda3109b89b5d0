//! A private Mosquitto 2.0 (Debian `mosquitto`; scripts/test.sh installs it): a websockets listener and the plain
//! MQTT listener it needs to start, on free loopback ports, killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{within, TempDir};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

pub struct Mosquitto {
    child: Child,
    /// The websockets listener (the gateway's upstream).
    pub ws: SocketAddr,
    /// The plain MQTT listener (watchers and checks from outside the gateway).
    pub mqtt: SocketAddr,
    _dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Mosquitto {
    /// Every client may do everything.
    pub async fn start() -> Mosquitto {
        Mosquitto::with_acl(None).await
    }

    /// With the ACL file `acl` (its `%u` patterns use the CONNECT username), or with none.
    pub async fn with_acl(acl: Option<&str>) -> Mosquitto {
        assert!(
            std::path::Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: apt-get install mosquitto"
        );
        let dir = TempDir::new("mosquitto");
        let (ws, mqtt) = (free_port(), free_port());
        let acl_path = dir.path("acl");
        std::fs::write(&acl_path, acl.unwrap_or_default()).expect("acl");
        let acl_line = match acl {
            Some(_) => format!("acl_file {}\n", acl_path.display()),
            None => String::new(),
        };
        let conf = dir.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\n{acl_line}persistence false\n\
                 listener {mqtt} 127.0.0.1\nprotocol mqtt\n\
                 listener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n"
            ),
        )
        .expect("conf");
        // Mosquitto drops root to the `mosquitto` user, which must read its files.
        use std::os::unix::fs::PermissionsExt;
        for p in [&dir.0, &acl_path, &conf] {
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let m = Mosquitto {
            child,
            ws: SocketAddr::from(([127, 0, 0, 1], ws)),
            mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt)),
            _dir: dir,
        };
        within(async {
            while TcpStream::connect(m.ws).await.is_err()
                || TcpStream::connect(m.mqtt).await.is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        m
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
