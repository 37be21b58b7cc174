//! Length-prefixed bincode frames. The 4-byte length is checked against the message's cap
//! before a byte of the body is allocated, the body grows with the bytes that arrive (within a
//! shared budget, and failing when it stalls); bincode's own limit then bounds every
//! collection inside, and trailing bytes are an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a frame or body was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge { len: u64, cap: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("no byte arrived for {}s", STALL_TIMEOUT.as_secs())]
    Stalled,
    #[error("{received} of {len} bytes arrived, slower than {MIN_BYTES_PER_SECOND} bytes/s")]
    TooSlow { received: usize, len: usize },
    #[error("busy: bodies in flight already hold the {budget}-byte budget")]
    Busy { budget: usize },
}

impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// bincode's standard config with an allocation limit of `LIMIT` bytes.
fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes `value` (no length prefix).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes exactly one `T` from `bytes`, allocating at most `CAP` bytes while doing so.
pub fn decode<T: DeserializeOwned, const CAP: usize>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() > CAP {
        return Err(FrameError::TooLarge {
            len: bytes.len() as u64,
            cap: CAP,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config::<CAP>())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// How long a frame may go without a byte arriving before the read fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest a body may arrive on average, after [`STALL_TIMEOUT`] of grace: a frame of
/// `n` bytes must be complete within `STALL_TIMEOUT + n / MIN_BYTES_PER_SECOND`. 16 KiB/s is
/// well below a home uplink (1 Mbit/s ≈ 122 KiB/s).
pub const MIN_BYTES_PER_SECOND: u64 = 16 << 10;
/// The body grows by at most this much per read, so memory follows the bytes that arrived,
/// not the length announced.
const READ_CHUNK: usize = 64 << 10;

/// Bytes that bodies being received may hold at once, shared by every stream of a protocol:
/// however many connections and streams announce large frames, together they hold at most
/// this much.
#[derive(Debug)]
pub struct ByteBudget {
    left: AtomicUsize,
    total: usize,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(ByteBudget {
            left: AtomicUsize::new(bytes),
            total: bytes,
        })
    }

    /// Bytes not held by a body now.
    pub fn available(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }
}

/// What one body holds of a [`ByteBudget`]; given back when the read ends, however it ends.
struct Held<'a> {
    budget: Option<&'a ByteBudget>,
    bytes: usize,
}

impl Held<'_> {
    fn grow(&mut self, n: usize) -> std::io::Result<()> {
        if let Some(b) = self.budget
            && !b.take(n)
        {
            return Err(FrameError::Busy { budget: b.total }.into());
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.budget {
            b.give(self.bytes);
        }
    }
}

/// How a frame is read: its largest length, a cap that may depend on the body's first byte
/// (an enum's variant tag), and the budget its body counts against.
#[derive(Clone, Copy)]
pub struct ReadLimits<'a> {
    pub max: usize,
    pub cap_for_tag: &'a (dyn Fn(u8) -> usize + Sync),
    pub budget: Option<&'a ByteBudget>,
    /// Whether the frame's first bytes must come within [`STALL_TIMEOUT`] too: a request's
    /// do; a response's may take as long as the request does (a verification).
    pub prompt_start: bool,
}

impl std::fmt::Debug for ReadLimits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadLimits {{ max: {} }}", self.max)
    }
}

/// Reads one frame of at most `cap` bytes (a response: its start may take as long as the
/// request does; once it has started, a stall fails it).
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, cap: usize) -> std::io::Result<Vec<u8>> {
    read_frame_limited(
        io,
        ReadLimits {
            max: cap,
            cap_for_tag: &|_| cap,
            budget: None,
            prompt_start: false,
        },
    )
    .await
}

/// Reads one frame within `limits`: the announced length is checked against `max`, then
/// against the cap of its kind once the first byte is in; the body grows with the bytes that
/// arrive (counted against the budget); a stream that stalls for [`STALL_TIMEOUT`] or falls
/// below [`MIN_BYTES_PER_SECOND`] fails.
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    io: &mut R,
    limits: ReadLimits<'_>,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    if limits.prompt_start {
        within_stall(io.read_exact(&mut len)).await??;
    } else {
        io.read_exact(&mut len).await?;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limits.max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            cap: limits.max,
        }
        .into());
    }
    let deadline = tokio::time::Instant::now()
        + STALL_TIMEOUT
        + Duration::from_secs_f64(len as f64 / MIN_BYTES_PER_SECOND as f64);
    let mut held = Held {
        budget: limits.budget,
        bytes: 0,
    };
    let mut body = Vec::new();
    while body.len() < len {
        let filled = body.len();
        let want = filled + (len - filled).min(READ_CHUNK);
        if want > held.bytes {
            held.grow(want - held.bytes)?;
        }
        body.resize(want, 0);
        let read = tokio::time::timeout_at(deadline, within_stall(io.read(&mut body[filled..])))
            .await
            .map_err(|_| FrameError::TooSlow {
                received: filled,
                len,
            })???;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.truncate(filled + read);
        if filled == 0 {
            let cap = (limits.cap_for_tag)(body[0]);
            if len > cap {
                return Err(FrameError::TooLarge {
                    len: len as u64,
                    cap,
                }
                .into());
            }
        }
    }
    Ok(body)
}

/// `read` bounded by [`STALL_TIMEOUT`].
async fn within_stall<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<std::io::Result<T>> {
    tokio::time::timeout(STALL_TIMEOUT, read)
        .await
        .map_err(|_| FrameError::Stalled.into())
}

/// Writes one frame; refuses bodies over `cap` (the peer would refuse them anyway).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    body: &[u8],
    cap: usize,
) -> std::io::Result<()> {
    if body.len() > cap || body.len() > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            cap,
        }
        .into());
    }
    io.write_all(&(body.len() as u32).to_le_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_frames_are_refused_before_allocation() {
        // Claims 4 GiB; nothing after. Reading must fail on the length alone.
        let mut io = futures::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
        let err = read_frame(&mut io, 1024).await.unwrap_err();
        assert!(err.to_string().contains("exceeds the cap of 1024"), "{err}");
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[tokio::test]
    async fn each_kind_of_frame_has_its_own_cap() {
        // Tag 1 may be 1,000 bytes, everything else 10.
        let cap_for_tag = |tag: u8| if tag == 1 { 1000 } else { 10 };
        let limits = ReadLimits {
            max: 1000,
            cap_for_tag: &cap_for_tag,
            budget: None,
            prompt_start: true,
        };
        let big = [vec![1u8], vec![7u8; 499]].concat();
        let mut io = futures::io::Cursor::new(frame(&big));
        assert_eq!(read_frame_limited(&mut io, limits).await.unwrap(), big);
        let mut small_kind = big.clone();
        small_kind[0] = 0;
        let mut io = futures::io::Cursor::new(frame(&small_kind));
        let err = read_frame_limited(&mut io, limits).await.unwrap_err();
        assert!(err.to_string().contains("exceeds the cap of 10"), "{err}");
    }

    #[tokio::test]
    async fn bodies_hold_what_arrived_within_a_shared_budget() {
        let budget = ByteBudget::new(100 << 10);
        let limits = ReadLimits {
            max: 1 << 20,
            cap_for_tag: &|_| 1 << 20,
            budget: Some(&budget),
            prompt_start: true,
        };
        // Announces 1 MiB, sends 3 bytes and ends: the read fails having held one chunk.
        let mut io =
            futures::io::Cursor::new([(1u32 << 20).to_le_bytes().to_vec(), vec![1, 2, 3]].concat());
        let err = read_frame_limited(&mut io, limits).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(budget.available(), 100 << 10, "given back");
        // A complete 200 KiB body is more than the budget: refused as busy, budget intact.
        let mut io = futures::io::Cursor::new(frame(&vec![5u8; 200 << 10]));
        let err = read_frame_limited(&mut io, limits).await.unwrap_err();
        assert!(err.to_string().contains("busy"), "{err}");
        assert_eq!(budget.available(), 100 << 10);
        // 80 KiB fits.
        let mut io = futures::io::Cursor::new(frame(&vec![5u8; 80 << 10]));
        assert_eq!(
            read_frame_limited(&mut io, limits).await.unwrap().len(),
            80 << 10
        );
        assert_eq!(budget.available(), 100 << 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_stall_timeout() {
        // The length and half the body, then nothing (the stream stays open).
        let sent = [64u32.to_le_bytes().to_vec(), vec![0u8; 32]].concat();
        let mut io =
            futures::io::Cursor::new(sent).chain(futures::io::AsyncReadExt::take(Silent, u64::MAX));
        let started = tokio::time::Instant::now();
        let err = read_frame(&mut io, 1024).await.unwrap_err();
        assert!(err.to_string().contains("no byte arrived"), "{err}");
        assert_eq!(started.elapsed().as_secs(), STALL_TIMEOUT.as_secs());
    }

    /// A stream that is open and never sends.
    struct Silent;

    impl AsyncRead for Silent {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
    }

    #[test]
    fn decode_bounds_collections_and_rejects_trailing_bytes() {
        // A Vec<u8> whose length prefix claims far more than the limit.
        let huge: Vec<u8> = encode(&vec![0u8; 10_000]).unwrap();
        assert!(matches!(
            decode::<Vec<u8>, 1000>(&huge),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bytes = encode(&(1u32, 2u32)).unwrap();
        assert_eq!(decode::<(u32, u32), 64>(&bytes).unwrap(), (1, 2));
        bytes.push(0);
        assert!(matches!(
            decode::<(u32, u32), 64>(&bytes),
            Err(FrameError::Trailing(1))
        ));
        // A length prefix of 2^60 elements inside a small buffer.
        let lying = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10];
        assert!(decode::<Vec<u64>, 1_000_000>(&lying).is_err());
    }

    #[test]
    fn byte_buffers_keep_the_sequence_wire_format_and_its_limit() {
        use crate::messages::BlobResponse;
        // BlobResponse with its group as a plain sequence: serde_bytes must not change the
        // wire format.
        #[derive(serde::Serialize)]
        #[allow(dead_code)]
        enum AsSequence {
            Outline { total: u64, cvs: Vec<[u8; 32]> },
            Group(Vec<u8>),
        }
        let bytes: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let wire = encode(&BlobResponse::Group(bytes.clone())).unwrap();
        assert_eq!(wire, encode(&AsSequence::Group(bytes.clone())).unwrap());
        assert_eq!(
            decode::<BlobResponse, 4096>(&wire).unwrap(),
            BlobResponse::Group(bytes)
        );
        assert!(matches!(
            decode::<BlobResponse, 1000>(&wire),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = futures::io::Cursor::new(Vec::new());
        write_frame(&mut buf, b"hello", 16).await.unwrap();
        let mut read = futures::io::Cursor::new(buf.into_inner());
        assert_eq!(read_frame(&mut read, 16).await.unwrap(), b"hello");
    }
}
