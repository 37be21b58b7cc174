//! `/herd/blob/2` answers on the wire: bincode's format byte for byte, but a group's bytes go
//! from the server's buffer straight to the stream, and from the stream straight into the
//! buffer the client keeps. The generic frame path copies them twice more on the way in (the
//! frame body, then the decoded vector) and once more on the way out (the encoded body); at a
//! MiB a group those copies were a fifth of what a connection's task does per byte.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::framing::{FrameError, decode, encode, read_frame_len, write_frame};
use crate::messages::BlobResponse;

/// `BlobResponse::Group`'s variant index as bincode writes it (a one-byte varint).
const GROUP_VARIANT: u8 = 1;

/// Writes `response` as one frame of at most `cap` bytes.
pub async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    response: BlobResponse,
    cap: usize,
) -> std::io::Result<()> {
    let BlobResponse::Group(bytes) = response else {
        return write_frame(io, &encode(&response)?, cap).await;
    };
    let mut header = vec![GROUP_VARIANT];
    header.extend(varint(bytes.len() as u64));
    let len = header.len() + bytes.len();
    if len > cap || len > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            cap,
        }
        .into());
    }
    io.write_all(&(len as u32).to_le_bytes()).await?;
    io.write_all(&header).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

/// Reads one response frame of at most `CAP` bytes; a group's length must fill the frame.
pub async fn read_response<R: AsyncRead + Unpin, const CAP: usize>(
    io: &mut R,
) -> std::io::Result<BlobResponse> {
    let len = read_frame_len(io, CAP).await?;
    if len == 0 {
        return Err(FrameError::Decode("empty frame".into()).into());
    }
    let mut variant = [0u8; 1];
    io.read_exact(&mut variant).await?;
    if variant[0] != GROUP_VARIANT {
        let mut body = vec![0u8; len];
        body[0] = variant[0];
        io.read_exact(&mut body[1..]).await?;
        return Ok(decode::<BlobResponse, CAP>(&body)?);
    }
    let (count, varint_len) = read_varint(io).await?;
    // Checked before allocating: the group's claimed length must be what the frame holds.
    if (1 + varint_len) as u64 + count != len as u64 {
        return Err(FrameError::Decode(format!(
            "a group of {count} bytes does not fill a frame of {len} bytes"
        ))
        .into());
    }
    let mut bytes = vec![0u8; count as usize];
    io.read_exact(&mut bytes).await?;
    Ok(BlobResponse::Group(bytes))
}

/// bincode's varint for an unsigned integer: below 251 one byte; otherwise a marker byte
/// (251, 252, 253 for 2, 4, 8 bytes) and the value little-endian.
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [&[251u8][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &n.to_le_bytes()].concat(),
    }
}

/// Reads a [`varint`]: the value and how many bytes it took.
async fn read_varint<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<(u64, usize)> {
    let mut first = [0u8; 1];
    io.read_exact(&mut first).await?;
    let width = match first[0] {
        0..=250 => return Ok((first[0] as u64, 1)),
        251 => 2,
        252 => 4,
        253 => 8,
        marker => {
            return Err(FrameError::Decode(format!("bad length marker {marker}")).into());
        }
    };
    let mut le = [0u8; 8];
    io.read_exact(&mut le[..width]).await?;
    Ok((u64::from_le_bytes(le), 1 + width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::read_frame;
    use futures::executor::block_on;
    use futures::io::Cursor;

    const CAP: usize = 1 << 21;

    fn written(response: BlobResponse) -> Vec<u8> {
        let mut io = Cursor::new(Vec::new());
        block_on(write_response(&mut io, response, CAP)).unwrap();
        io.into_inner()
    }

    #[test]
    fn responses_keep_bincodes_wire_format_and_round_trip() {
        let group = |n: usize| BlobResponse::Group((0..n).map(|i| (i % 251) as u8).collect());
        let responses = [
            group(0),
            group(250),
            group(251),
            group(70_000),
            group(1 << 20),
            BlobResponse::NotFound,
            BlobResponse::Outline {
                total: 5,
                cvs: vec![[7; 32]],
            },
        ];
        for response in responses {
            let wire = written(response.clone());
            // What the generic frame path writes and reads, byte for byte.
            let mut generic = Cursor::new(Vec::new());
            block_on(write_frame(&mut generic, &encode(&response).unwrap(), CAP)).unwrap();
            assert_eq!(wire, generic.into_inner());
            let body = block_on(read_frame(&mut Cursor::new(wire.clone()), CAP)).unwrap();
            assert_eq!(decode::<BlobResponse, CAP>(&body).unwrap(), response);
            let read = block_on(read_response::<_, CAP>(&mut Cursor::new(wire))).unwrap();
            assert_eq!(read, response);
        }
    }

    #[test]
    fn lying_and_oversized_frames_are_refused_before_allocation() {
        let read = |wire: Vec<u8>| block_on(read_response::<_, 4096>(&mut Cursor::new(wire)));
        // A frame claiming more than the cap.
        let err = read(vec![0xff, 0xff, 0xff, 0x7f, 1]).unwrap_err();
        assert!(err.to_string().contains("exceeds the cap"), "{err}");
        // A group claiming 2^60 bytes inside a 10-byte frame: refused, nothing allocated.
        let mut wire = 10u32.to_le_bytes().to_vec();
        wire.extend([GROUP_VARIANT, 253]);
        wire.extend((1u64 << 60).to_le_bytes());
        let err = read(wire).unwrap_err();
        assert!(err.to_string().contains("does not fill a frame"), "{err}");
        // A group shorter than its frame (trailing bytes) and a frame cut short.
        let mut wire = written(BlobResponse::Group(vec![1, 2, 3]));
        wire[0] += 1;
        wire.push(0);
        assert!(read(wire).is_err());
        let mut wire = written(BlobResponse::Group(vec![1, 2, 3]));
        wire.pop();
        assert!(read(wire).is_err());
        // A bad length marker and an empty frame.
        assert!(read(vec![2, 0, 0, 0, GROUP_VARIANT, 254]).is_err());
        assert!(read(vec![0, 0, 0, 0]).is_err());
        // Refused on the way out too.
        let mut io = Cursor::new(Vec::new());
        let too_big = BlobResponse::Group(vec![0; 5000]);
        assert!(block_on(write_response(&mut io, too_big, 4096)).is_err());
    }
}
