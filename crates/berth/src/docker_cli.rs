//! `berth volume …`: snapshots of Docker volumes, asked of the running Docker plugin over its
//! socket (the plugin owns the data dir, so the CLI never opens the engine itself).

use std::path::PathBuf;

use anyhow::Result;

/// Where the socket plugin listens; for the managed plugin give
/// `/run/docker/plugins/<plugin id>/berth.sock`.
const SOCKET_HELP: &str = "The plugin's socket";

#[derive(Debug, clap::Subcommand)]
pub(crate) enum VolumeCommand {
    /// Snapshot a Docker volume (crash-consistent while containers write to it).
    Snapshot {
        volume: String,
        snapshot: String,
        #[arg(long, default_value = berth_docker::DEFAULT_SOCKET, env = "BERTH_DOCKER_SOCKET", help = SOCKET_HELP)]
        socket: PathBuf,
    },
    /// List a Docker volume's snapshots.
    Snapshots {
        volume: String,
        #[arg(long, default_value = berth_docker::DEFAULT_SOCKET, env = "BERTH_DOCKER_SOCKET", help = SOCKET_HELP)]
        socket: PathBuf,
    },
    /// Delete a snapshot (by name or id). Restore one first with
    /// `docker volume create -d berth -o fromSnapshot=NAME NEW`.
    RmSnapshot {
        snapshot: String,
        #[arg(long, default_value = berth_docker::DEFAULT_SOCKET, env = "BERTH_DOCKER_SOCKET", help = SOCKET_HELP)]
        socket: PathBuf,
    },
}

pub(crate) fn run(command: VolumeCommand) -> Result<()> {
    use berth_docker::client;
    match command {
        VolumeCommand::Snapshot {
            volume,
            snapshot,
            socket,
        } => {
            let s = client::create_snapshot(&socket, &volume, &snapshot)?;
            println!("{}", s.name);
        }
        VolumeCommand::Snapshots { volume, socket } => {
            let all = client::list_snapshots(&socket, &volume)?;
            println!("{:<32} {:<32} {:>10} CREATED", "NAME", "ID", "SIZE");
            for s in all {
                println!(
                    "{:<32} {:<32} {:>10} {}",
                    s.name,
                    s.id,
                    berth_docker::options::human_size(s.size_bytes),
                    s.created_at.unwrap_or_default()
                );
            }
        }
        VolumeCommand::RmSnapshot { snapshot, socket } => client::remove_snapshot(&socket, &snapshot)?,
    }
    Ok(())
}
