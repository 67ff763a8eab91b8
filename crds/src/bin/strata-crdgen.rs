//! strata-crdgen: writes (or checks) the generated CRD YAML and API reference.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata_crds::generate::{REGENERATE, generated_files};

#[derive(Parser)]
#[command(
    version,
    about = "Generate Strata's CRD YAML and API reference from the Rust types"
)]
struct Cli {
    /// Repository root (default: the workspace this binary was built from).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write every generated file.
    Write,
    /// Fail if any committed file differs from what the code generates.
    Check,
    /// Print the CRDs as one multi-document YAML stream (for `kubectl apply -f -`).
    Print,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = cli.root.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default()
    });
    let files = match generated_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Print => {
            for f in files.iter().filter(|f| f.path.starts_with("crds/yaml")) {
                println!("---\n{}", f.contents);
            }
            ExitCode::SUCCESS
        }
        Command::Write => {
            for f in &files {
                let path = root.join(&f.path);
                if let Some(dir) = path.parent()
                    && let Err(e) = std::fs::create_dir_all(dir)
                {
                    eprintln!("error: creating {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                if let Err(e) = std::fs::write(&path, &f.contents) {
                    eprintln!("error: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", f.path.display());
            }
            ExitCode::SUCCESS
        }
        Command::Check => {
            let mut drift = Vec::new();
            for f in &files {
                match std::fs::read_to_string(root.join(&f.path)) {
                    Ok(current) if current == f.contents => {}
                    Ok(_) => drift.push(format!("{} differs", f.path.display())),
                    Err(_) => drift.push(format!("{} is missing", f.path.display())),
                }
            }
            if drift.is_empty() {
                println!("generated files are up to date ({} files)", files.len());
                ExitCode::SUCCESS
            } else {
                for d in &drift {
                    eprintln!("drift: {d}");
                }
                eprintln!(
                    "the committed generated files differ from the code; run `{REGENERATE}` and commit the result"
                );
                ExitCode::FAILURE
            }
        }
    }
}
