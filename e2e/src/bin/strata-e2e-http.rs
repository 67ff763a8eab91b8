//! strata-e2e-http: a trivial HTTP process for the pod runner's self-test.
//!
//! `strata-e2e-http --listen 127.64.0.5:8080 --name ns/pod` answers
//! `GET /healthz` and `GET /readyz` with "ok", `GET /` with "hello from <name>", and
//! `GET /exit?code=N` by answering and then exiting with status N (a crash,
//! as far as the pod runner can tell). Test-only; never in a product image.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    /// Address to listen on (the pod IP and a port).
    #[arg(long)]
    listen: SocketAddr,
    /// Name reported in answers.
    #[arg(long, default_value = "strata-e2e-http")]
    name: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let listener = match TcpListener::bind(cli.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("listen {}: {e}", cli.listen);
            return ExitCode::from(2);
        }
    };
    eprintln!("listening on {}", cli.listen);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        // Drain the headers.
        let mut header = String::new();
        while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
            header.clear();
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (status, body, exit) = if path == "/healthz" || path == "/readyz" {
            ("200 OK", "ok".to_string(), None)
        } else if let Some(code) = path.strip_prefix("/exit?code=") {
            ("200 OK", "exiting".to_string(), code.parse::<u8>().ok())
        } else if path == "/" {
            ("200 OK", format!("hello from {}", cli.name), None)
        } else {
            ("404 Not Found", "not found".to_string(), None)
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.flush();
        if let Some(code) = exit {
            eprintln!("exiting with {code} as asked");
            return ExitCode::from(code);
        }
    }
    ExitCode::SUCCESS
}
