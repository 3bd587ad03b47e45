//! A PostgreSQL cluster of one test's own that the test can stop and start again (the
//! reliability tests restart the database under a running gateway). Made from the machine's
//! `initdb` and `pg_ctl`, on a free 127.0.0.1 port; stopped and deleted when dropped.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use diesel::{Connection, PgConnection};

use super::{cluster_shell, postgres_bin_dir, shell_quote};

pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PgCluster {
    /// `initdb` and a first start; panics with the reason when the machine cannot do it.
    pub fn start() -> PgCluster {
        let bin = postgres_bin_dir().expect("no initdb under /usr/lib/postgresql/*/bin/ or on PATH");
        let as_postgres = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("peekgate-restart-pg-").tempdir().unwrap().keep();
        if as_postgres {
            assert!(std::process::Command::new("chown").arg("postgres").arg(&dir).status().unwrap().success());
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = PgCluster { bin, dir, port, as_postgres };
        let initdb = format!(
            "{} -D {} -U postgres -A trust -E UTF8 --no-sync >/dev/null 2>&1",
            cluster.path("initdb"),
            cluster.data()
        );
        assert!(cluster_shell(&initdb, as_postgres).status().unwrap().success(), "initdb failed");
        cluster.resume();
        cluster
    }

    fn path(&self, program: &str) -> String {
        shell_quote(&self.bin.join(program).display().to_string())
    }

    fn data(&self) -> String {
        shell_quote(&self.dir.join("data").display().to_string())
    }

    /// The admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        use diesel::connection::SimpleConnection;
        let mut admin = PgConnection::establish(&self.admin_url()).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: connections are cut, like a crash).
    pub fn stop(&self) {
        let stop = format!("{} -D {} -m immediate -w stop >/dev/null 2>&1", self.path("pg_ctl"), self.data());
        assert!(cluster_shell(&stop, self.as_postgres).status().unwrap().success(), "pg_ctl stop failed");
    }

    /// Starts the server again on the same port and data, and waits until it answers.
    pub fn resume(&self) {
        let log = shell_quote(&self.dir.join("postgres.log").display().to_string());
        let options = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        let start = format!(
            "{} -D {} -o {} -l {log} -w start >/dev/null 2>&1",
            self.path("pg_ctl"),
            self.data(),
            shell_quote(&options)
        );
        assert!(cluster_shell(&start, self.as_postgres).status().unwrap().success(), "pg_ctl start failed");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while PgConnection::establish(&self.admin_url()).is_err() {
            assert!(std::time::Instant::now() < deadline, "the cluster did not come back");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let stop = format!("{} -D {} -m immediate -w stop >/dev/null 2>&1", self.path("pg_ctl"), self.data());
        let _ = cluster_shell(&stop, self.as_postgres).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
