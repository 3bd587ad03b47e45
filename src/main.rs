//! The `peekgate` command line (design.md §8).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peekgate::config::{Config, Settings};
use peekgate::keys::SigningKey;

#[derive(Parser)]
#[command(
    name = "peekgate",
    version,
    about = "Matrix federation peeking gateway"
)]
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
}

fn load_settings(explicit: Option<PathBuf>) -> Result<Settings, String> {
    let file = Config::locate(explicit);
    Config::load(file.as_deref())
        .and_then(Config::validate)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::GenerateKey { path, config } => generate_key(path, config),
        Command::Migrate { config } => migrate(config),
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(peekgate::app::serve(settings))
        .map_err(|e| format!("{e:#}"))
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
    let db = peekgate::db::Db::connect(&settings.raw.database.url, 1).map_err(|e| e.to_string())?;
    let applied = db.migrate().map_err(|e| e.to_string())?;
    println!("{applied} migration(s) applied");
    Ok(())
}
