//! Length-prefixed bincode frames. The 4-byte length is checked against the message's cap
//! before a byte of the body is allocated; bincode's own limit then bounds every collection
//! inside, and trailing bytes are an error.

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

/// Reads one frame of at most `cap` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, cap: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as u64;
    if len > cap as u64 {
        return Err(FrameError::TooLarge { len, cap }.into());
    }
    let mut body = vec![0u8; len as usize];
    io.read_exact(&mut body).await?;
    Ok(body)
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

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        // Claims 4 GiB; nothing after. Reading must fail on the length alone.
        let mut io = futures::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
        let err = futures::executor::block_on(read_frame(&mut io, 1024)).unwrap_err();
        assert!(err.to_string().contains("exceeds the cap of 1024"), "{err}");
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

    #[test]
    fn frames_round_trip() {
        let mut buf = futures::io::Cursor::new(Vec::new());
        futures::executor::block_on(write_frame(&mut buf, b"hello", 16)).unwrap();
        let mut read = futures::io::Cursor::new(buf.into_inner());
        assert_eq!(
            futures::executor::block_on(read_frame(&mut read, 16)).unwrap(),
            b"hello"
        );
    }
}
