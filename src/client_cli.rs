//! `locus get|put|delete|list`: the geo-aware client ([`locus_client`]) on the command line, for
//! scripts and operators. Answers are JSON on stdout; errors go to stderr with exit code 1 (and a
//! read of an absent record prints `null` and exits 1, so `if locus get …` reads naturally).

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use locus_client::{Client, ClientConfig, Consistency, WriteOptions};
use serde_json::Value;

#[derive(Debug, Args)]
pub struct Connection {
    /// Region URLs to discover the deployment from (comma-separated).
    #[arg(
        long,
        env = "LOCUS_SEEDS",
        default_value = "http://127.0.0.1:7101",
        value_delimiter = ','
    )]
    pub seeds: Vec<String>,
    /// Bearer token.
    #[arg(long, env = "LOCUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Read a record: the record, or its siblings with their ETag.
    Get {
        collection: String,
        key: String,
        /// Read at the record's home leader.
        #[arg(long)]
        home: bool,
        /// Read nearby only if every region's heartbeats put it at most this far behind.
        #[arg(long)]
        max_staleness_ms: Option<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Write a record's value (JSON; `-` reads it from stdin).
    Put {
        collection: String,
        key: String,
        value: String,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a record.
    Delete {
        collection: String,
        key: String,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// One page of a collection's records in key order.
    List {
        collection: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// The `next` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Write only if the record's ETag is still this.
    #[arg(long)]
    pub if_match: Option<String>,
    /// Write only if the record does not exist.
    #[arg(long)]
    pub create_only: bool,
    /// Home region of a new record.
    #[arg(long)]
    pub home_region: Option<String>,
    /// Send the write under this key (that of an earlier attempt whose outcome is unknown).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

impl WriteArgs {
    fn options(self) -> WriteOptions {
        WriteOptions {
            if_match: self.if_match,
            create_only: self.create_only,
            home: self.home_region,
            idempotency_key: self.idempotency_key,
        }
    }
}

async fn connect(connection: Connection) -> anyhow::Result<Client> {
    let mut config = ClientConfig::new(connection.seeds);
    config.token = connection.token;
    Client::connect(config)
        .await
        .context("discovering the deployment")
}

fn print(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn run(command: ClientCommand) -> anyhow::Result<()> {
    match command {
        ClientCommand::Get {
            collection,
            key,
            home,
            max_staleness_ms,
            connection,
        } => {
            let consistency = match (home, max_staleness_ms) {
                (true, _) => Consistency::Home,
                (false, Some(ms)) => Consistency::MaxStaleness(Duration::from_millis(ms)),
                (false, None) => Consistency::Nearest,
            };
            let client = connect(connection).await?;
            match client.get_with(&collection, &key, consistency).await? {
                Some(found) => print(&found),
                None => {
                    println!("null");
                    std::process::exit(1);
                }
            }
        }
        ClientCommand::Put {
            collection,
            key,
            value,
            write,
            connection,
        } => {
            let text = if value == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the value from stdin")?;
                text
            } else {
                value
            };
            let value: Value = serde_json::from_str(&text).context("the value is not JSON")?;
            let client = connect(connection).await?;
            print(
                &client
                    .put_with(&collection, &key, &value, write.options())
                    .await?,
            )
        }
        ClientCommand::Delete {
            collection,
            key,
            write,
            connection,
        } => {
            let client = connect(connection).await?;
            print(
                &client
                    .delete_with(&collection, &key, write.options())
                    .await?,
            )
        }
        ClientCommand::List {
            collection,
            prefix,
            limit,
            cursor,
            connection,
        } => {
            let client = connect(connection).await?;
            print(
                &client
                    .list(&collection, prefix.as_deref(), limit, cursor.as_deref())
                    .await?,
            )
        }
    }
}
