//! The `locus` command: parse the command line and hand over to the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A write allocates and frees many small buffers on several threads (HTTP, JSON, the event, the
/// batch); glibc's allocator spent about a fifth of the process's time on them under load, in
/// consolidation and locking, which mimalloc's per-thread pages avoid. Built without its
/// transparent huge pages (the `no_thp` feature): it returns freed memory to the kernel and takes
/// it back, and each first touch then cleared a whole 2 MiB page. That clearing was a sixth of the
/// machine's time in a repair round, and left the bench's two regions at 125–152 MiB peak instead
/// of 86–93 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "locus",
    version,
    about = "A multi-leader geo-replicated JSON record store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one region.
    Serve {
        /// The region's config file, e.g. regions/eu.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the local three-region deployment (regions/eu.toml, us.toml, ap.toml) in one process.
    Dev {
        /// Drop the dev databases and streams first.
        #[arg(long)]
        reset: bool,
        /// Folder holding eu.toml, us.toml and ap.toml.
        #[arg(long, default_value = "regions")]
        regions: PathBuf,
        /// Use this NATS (with JetStream) instead of starting one. Either way it replaces the
        /// region files' nats_url.
        #[arg(long)]
        nats: Option<String>,
        /// The port of the nats-server `locus dev` starts (installed on first use into
        /// target/tools, its data kept in target/dev-nats).
        #[arg(long, default_value_t = 4322)]
        nats_port: u16,
    },
    /// Exit 0 when a region answers its liveness check (the container health check).
    Health {
        #[arg(
            long,
            env = "LOCUS_HEALTH_URL",
            default_value = "http://127.0.0.1:7101/healthz"
        )]
        url: String,
        /// PEM CA certificates to trust for an https URL (a private CA), besides Mozilla's roots.
        #[arg(long, env = "LOCUS_HEALTH_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Resolver authoring.
    #[command(subcommand)]
    Resolver(ResolverCommand),
    /// Deployment membership.
    #[command(subcommand)]
    Region(RegionCommand),
    /// Print the `authorization` block of a nats-server config for a deployment: one user per
    /// region, allowed only what that region needs, its password taken from the nats-server's
    /// environment variable NATS_PASSWORD_<REGION> (upper case, '-' as '_').
    NatsUsers {
        /// The deployment's name (the regions' `deployment`).
        #[arg(long)]
        deployment: String,
        /// Also an `admin` user that may do anything (NATS_PASSWORD_ADMIN), for operators.
        #[arg(long)]
        admin: bool,
        /// The region ids.
        #[arg(required = true)]
        regions: Vec<String>,
    },
    /// Benchmarks that print measured figures.
    #[command(subcommand)]
    Bench(locus::bench::BenchCommand),
    #[command(flatten)]
    Client(locus::client_cli::ClientCommand),
}

#[derive(Debug, Subcommand)]
enum RegionCommand {
    /// Retire a region: move its records to another region, then remove its stream and consumers.
    /// Sent to the region itself (found through --url), or, with --gone, to the region at --url.
    Retire {
        /// The region to retire.
        id: String,
        /// The region that homes its records from now on.
        #[arg(long)]
        rehome_to: String,
        /// Any region of the deployment.
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        url: String,
        /// The region is gone for good (its disk lost): the region at --url takes over its records.
        #[arg(long)]
        gone: bool,
        #[arg(long, env = "LOCUS_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: String,
    },
}

#[derive(Debug, Subcommand)]
enum ResolverCommand {
    /// Write a standalone resolver crate, ready to test, build and upload.
    New {
        /// The resolver's name: the crate's, and the name to upload it under.
        name: String,
        /// The folder to create it in.
        #[arg(long, default_value = ".")]
        path: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    locus::logging::init().map_err(anyhow::Error::msg)?;
    match Cli::parse().command {
        Command::Serve { config } => locus::app::serve(&config).await,
        Command::Dev {
            reset,
            regions,
            nats,
            nats_port,
        } => locus::app::dev(&regions, reset, nats, nats_port).await,
        Command::Health { url, ca_file } => locus::app::health(&url, ca_file.as_deref()).await,
        Command::Resolver(ResolverCommand::New { name, path }) => {
            let root = locus::scaffold::create(&name, &path)?;
            println!(
                "created {}: its README says how to test, build and upload it",
                root.display()
            );
            Ok(())
        }
        Command::Bench(command) => locus::bench::run(command).await,
        Command::Client(command) => locus::client_cli::run(command).await,
        Command::NatsUsers {
            deployment,
            admin,
            regions,
        } => {
            print!("{}", locus::app::nats_users(&deployment, &regions, admin)?);
            Ok(())
        }
        Command::Region(RegionCommand::Retire {
            id,
            rehome_to,
            url,
            gone,
            admin_token,
        }) => locus::app::retire(&url, &id, &rehome_to, gone, &admin_token).await,
    }
}
