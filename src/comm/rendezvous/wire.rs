//! The rendezvous' wire: one bounded JSON line each way, signed with the run's key
//! (HMAC-SHA256 over the other side's nonce), and the limits that keep a stranger on the
//! port from costing more than its own connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::LaunchEnv;

/// The longest join line rank 0 reads (a join is a few hundred bytes).
pub(super) const MAX_JOIN_LINE: usize = 64 << 10;
/// The longest answer a rank reads (every rank's join and the NCCL ids).
pub(super) const MAX_REPLY_LINE: usize = 16 << 20;
/// How long one connection may take to greet rank 0 and join, in all.
pub(super) const JOIN_DEADLINE: Duration = Duration::from_secs(10);
/// Connections being read at once; more are closed unread until one is done.
pub(super) const MAX_PENDING: usize = 64;

/// The key every join and answer is signed with: the run's secret, or, without one, the
/// job's id (weaker: anyone who knows the job can join; rank 0 warns).
pub(super) fn run_key(env: &LaunchEnv) -> Vec<u8> {
    match &env.secret {
        Some(secret) => secret.as_bytes().to_vec(),
        None => {
            let job = ["SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"]
                .iter()
                .find_map(|v| std::env::var(v).ok())
                .unwrap_or_default();
            format!(
                "mmpipe rendezvous without a secret: job {job}, port {}",
                env.master_port
            )
            .into_bytes()
        }
    }
}

pub(super) fn mac(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    hex(&m.finalize().into_bytes())
}

/// Whether `tag` is `mac(key, parts)`, compared in constant time.
pub(super) fn mac_ok(key: &[u8], parts: &[&[u8]], tag: &str) -> bool {
    let Some(tag) = unhex(tag) else {
        return false;
    };
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.verify_slice(&tag).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(super) fn nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// Rank 0's greeting: the nonce a join must sign.
#[derive(Serialize, Deserialize)]
pub(super) struct Hello {
    pub(super) nonce: String,
}

/// A join as it travels: the join's JSON (signed as sent), the joiner's nonce for the
/// answer, and the signature over rank 0's nonce, the join and the joiner's nonce.
#[derive(Serialize, Deserialize)]
pub(super) struct SignedJoin {
    pub(super) join: String,
    pub(super) nonce: String,
    pub(super) mac: String,
}

/// An answer as it travels: the reply's JSON and its signature over the joiner's nonce.
#[derive(Serialize, Deserialize)]
pub(super) struct SignedReply {
    pub(super) reply: String,
    pub(super) mac: String,
}

pub(super) fn write_line<T: Serialize>(stream: &mut TcpStream, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).expect("plain data");
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

/// One line of at most `limit` bytes, read before `deadline` (however slowly the peer
/// sends: the deadline is for the whole line).
pub(super) fn read_bounded_line(
    stream: &mut TcpStream,
    limit: usize,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete line in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            return Ok(line);
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line of over {limit} bytes"),
            ));
        }
    }
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}
