//! The `peekgate` command line (design.md §8).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peekgate::config::{Config, Settings};
use peekgate::keys::SigningKey;

mod bench;

#[derive(Parser)]
#[command(name = "peekgate", version, about = "Matrix federation peeking gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (generates the signing key and migrates the database on first start).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a new signing key in Synapse's format; refuses to overwrite.
    GenerateKey {
        /// Defaults to the configured `signing.key_path`.
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print benchmark figures (build with --release).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Manage local users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Inbound, outbound and device peeks.
    Peeks {
        #[command(subcommand)]
        command: PeeksCommand,
    },
    /// Federation destinations of the sender and their back-off.
    Destinations {
        #[command(subcommand)]
        command: DestinationsCommand,
    },
    /// Check federation with a server: resolution, keys, clock skew, a signed request.
    /// Exits 0 only when every step passes.
    CheckFederation {
        server_name: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PeeksCommand {
    /// List open peeks of every kind.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DestinationsCommand {
    /// List destinations with their cursor and back-off.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Clear a destination's back-off; a running sender retries within seconds.
    Reset {
        server_name: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Appends per second, /state of a 1,000-member room, signed GET /event throughput (wrk).
    Rooms {
        /// Admin URL of a PostgreSQL server; a scratch database is created and dropped.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres: String,
        #[arg(long, default_value_t = 2000)]
        appends: usize,
        /// Seconds of wrk load on GET /event.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// One event to N peeking destinations, sustained delivery, renewal PUTs/s (wrk),
    /// eviction of 100,000 lapsed peeks, memory with 100,000 peeks (PostgreSQL).
    Peeks {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres: String,
        #[arg(long, default_value_t = 1000)]
        destinations: usize,
        /// Events in the sustained run.
        #[arg(long, default_value_t = 200)]
        sustained: usize,
        /// Seconds of wrk load on renewal PUTs.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Single events fanned out one at a time (for the latency percentiles).
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Concurrent senders in the sustained run.
        #[arg(long, default_value_t = 4)]
        appenders: usize,
        /// The receiver authenticates every `/send` as a homeserver would (canonical body,
        /// X-Matrix signature) and refuses any that fails; it then uses much more CPU, on the
        /// same cores as the gateway.
        #[arg(long)]
        verify_signatures: bool,
        /// Of the destinations, this many are servers joined to the room instead of peeking it
        /// (JN-10: they get our users' events, which are all the bench sends).
        #[arg(long, default_value_t = 0)]
        joined: usize,
    },
    /// Signing one `/send` body's X-Matrix headers for N destinations: one by one, and in the
    /// sender's batches (no network, no database; one core).
    Signing {
        #[arg(long, default_value_t = 1000)]
        destinations: usize,
        /// Bodies signed per figure.
        #[arg(long, default_value_t = 20)]
        bodies: usize,
    },
    /// Time to deliver a burst to healthy peeking destinations, alone and beside 20 silent
    /// destinations and one that answers 400 (issue #11 H5; PostgreSQL).
    DeadPeers {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres: String,
        #[arg(long, default_value_t = 50)]
        healthy: usize,
        /// Events in each burst.
        #[arg(long, default_value_t = 200)]
        events: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Event accepted at gateway A -> seen in a long-polling /sync on gateway B that peeks it.
    Sync {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres: String,
        #[arg(long, default_value_t = 1000)]
        events: usize,
    },
    /// Joining a 1,000-member room hosted by another peekgate (make_join, send_join, validated and
    /// stored), and send_join served for it (issue #12; PostgreSQL).
    Joins {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")]
        postgres: String,
        /// Local members of the room besides its creator.
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Runs of each figure; each run is a different joining user.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// The lightweight receiver `bench peeks` runs as a child process.
    #[command(hide = true)]
    Receiver {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a local user (works whatever `client.registration` says).
    Create {
        localpart: String,
        #[arg(long)]
        password: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load_settings(explicit: Option<PathBuf>) -> Result<Settings, String> {
    let file = Config::locate(explicit);
    Config::load(file.as_deref()).and_then(Config::validate).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let code = run(Cli::parse());
    // Every pool is gone by now; see `settle_connects` for why exiting at once can crash.
    peekgate::db::settle_connects(std::time::Duration::from_secs(15));
    code
}

fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::GenerateKey { path, config } => generate_key(path, config),
        Command::Migrate { config } => migrate(config),
        Command::Bench { command } => bench(command),
        Command::User { command: UserCommand::Create { localpart, password, admin, config } } => {
            create_user(&localpart, &password, admin, config)
        }
        Command::Peeks { command: PeeksCommand::List { json, config } } => list_peeks(json, config),
        Command::Destinations { command: DestinationsCommand::List { json, config } } => {
            list_destinations(json, config)
        }
        Command::Destinations { command: DestinationsCommand::Reset { server_name, config } } => {
            reset_destination(&server_name, config)
        }
        Command::CheckFederation { server_name, config } => return check_federation(&server_name, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn serve(config: Option<PathBuf>) -> Result<(), String> {
    let settings = load_settings(config)?;
    peekgate::logging::init(&settings.raw.log);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(peekgate::app::serve(settings)).map_err(|e| format!("{e:#}"))
}

fn generate_key(path: Option<PathBuf>, config: Option<PathBuf>) -> Result<(), String> {
    let path = match path {
        Some(path) => path,
        None => load_settings(config)?.raw.signing.key_path,
    };
    let key = SigningKey::write_new(&path).map_err(|e| e.to_string())?;
    println!("wrote {} to {}", key.key_id(), path.display());
    Ok(())
}

fn migrate(config: Option<PathBuf>) -> Result<(), String> {
    let settings = load_settings(config)?;
    peekgate::logging::init(&settings.raw.log);
    let db = peekgate::db::Db::connect_for_command(&settings.raw.database.url).map_err(|e| e.to_string())?;
    let applied = db.migrate().map_err(|e| e.to_string())?;
    println!("{applied} migration(s) applied");
    Ok(())
}

fn create_user(localpart: &str, password: &str, admin: bool, config: Option<PathBuf>) -> Result<(), String> {
    let settings = load_settings(config)?;
    let user_id =
        peekgate::accounts::validate_localpart(localpart, &settings.server_name).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let db = peekgate::db::Db::connect_for_command(&settings.raw.database.url).map_err(|e| e.to_string())?;
        db.migrate().map_err(|e| e.to_string())?;
        let accounts = peekgate::accounts::Accounts::new(db);
        accounts.create_user(&user_id, password, admin).await.map_err(|e| e.to_string())
    })?;
    println!("created {user_id}{}", if admin { " (admin)" } else { "" });
    Ok(())
}

fn bench(command: BenchCommand) -> Result<(), String> {
    peekgate::logging::init(&peekgate::config::LogConfig { format: "plain".into(), filter: "error".into() });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let result = runtime.block_on(async {
        match command {
            BenchCommand::Rooms { postgres, appends, seconds } => bench::rooms(&postgres, appends, seconds).await,
            BenchCommand::Peeks {
                postgres,
                destinations,
                sustained,
                seconds,
                rounds,
                appenders,
                verify_signatures,
                joined,
            } => {
                let options = bench::PeeksOptions {
                    destinations,
                    sustained,
                    wrk_seconds: seconds,
                    rounds,
                    appenders,
                    verify_signatures,
                    joined,
                };
                bench::peeks(&postgres, options).await
            }
            BenchCommand::Sync { postgres, events } => bench::sync(&postgres, events).await,
            BenchCommand::DeadPeers { postgres, healthy, events, rounds } => {
                bench::dead_peers(&postgres, healthy, events, rounds).await
            }
            BenchCommand::Joins { postgres, members, runs } => bench::joins(&postgres, members, runs).await,
            BenchCommand::Receiver { bind } => bench::receiver(&bind).await,
            BenchCommand::Signing { destinations, bodies } => bench::signing(destinations, bodies),
        }
    });
    result.map_err(|e| format!("{e:#}"))
}

/// Runs `work` on a database connection of the configured database (migrated first).
fn with_db<T>(
    config: Option<PathBuf>,
    work: impl AsyncFnOnce(peekgate::db::Db) -> Result<T, String>,
) -> Result<T, String> {
    let settings = load_settings(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let db = peekgate::db::Db::connect_for_command(&settings.raw.database.url).map_err(|e| e.to_string())?;
        db.migrate().map_err(|e| e.to_string())?;
        work(db).await
    })
}

fn list_peeks(json: bool, config: Option<PathBuf>) -> Result<(), String> {
    let report = with_db(config, async |db| peekgate::admin::peeks(&db).await.map_err(|e| e.to_string()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print!("{}", peekgate::admin::render_peeks(&report));
    }
    Ok(())
}

fn list_destinations(json: bool, config: Option<PathBuf>) -> Result<(), String> {
    let list = with_db(config, async |db| peekgate::admin::destinations(&db).await.map_err(|e| e.to_string()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?);
    } else {
        print!("{}", peekgate::admin::render_destinations(&list, peekgate::clock::now_ms()));
    }
    Ok(())
}

fn reset_destination(server: &str, config: Option<PathBuf>) -> Result<(), String> {
    let server = server.to_owned();
    let found =
        with_db(config, async |db| peekgate::admin::reset_destination(&db, &server).await.map_err(|e| e.to_string()))?;
    if !found {
        return Err(format!("{server} is not a destination"));
    }
    println!("reset {server}: back-off cleared; a running sender retries within seconds");
    Ok(())
}

fn check_federation(server: &str, config: Option<PathBuf>) -> ExitCode {
    let run = || -> Result<bool, String> {
        let settings = load_settings(config)?;
        let server = ruma::ServerName::parse(server).map_err(|e| format!("{server:?} is not a server name: {e}"))?;
        peekgate::app::install_crypto_provider();
        // Our own key signs the last step; without one, that step fails with the reason.
        let key = peekgate::keys::SigningKey::load(&settings.raw.signing.key_path);
        let key_problem = key.as_ref().err().map(|e| e.to_string());
        let key = std::sync::Arc::new(key.unwrap_or_else(|_| SigningKey::generate()));
        let dns = std::sync::Arc::new(peekgate::federation::resolve::HickoryDns::from_system());
        let client =
            peekgate::federation::client::FederationClient::new(&settings, key, dns).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
        let steps = runtime.block_on(peekgate::federation::check::check(&client, &server));
        println!("check-federation {server} (as {})", settings.server_name);
        let mut all_ok = true;
        for step in steps {
            let mut detail = step.detail;
            if step.name == "signed request" {
                if let Some(problem) = &key_problem {
                    detail = format!("{detail} (our signing key: {problem})");
                }
            }
            println!("{:<18} {}  {detail}", step.name, if step.ok { "pass" } else { "FAIL" });
            all_ok &= step.ok;
        }
        Ok(all_ok)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
