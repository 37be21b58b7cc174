//! The download paths through a real server on 127.0.0.1 and the real `curl`.

use std::path::Path;
use std::process::Command;

use super::*;
use crate::checkpoint::{Checkpoint, CheckpointFile};

const ID: &str = "round-00001";
const FILE: &str = "adapter_model.safetensors";

/// A served checkpoint dir with one 200 kB file; returns the base URL and the file's bytes.
async fn serve(dir: &Path) -> (String, Vec<u8>) {
    let bytes: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::create_dir_all(dir.join(ID)).unwrap();
    std::fs::write(dir.join(ID).join(FILE), &bytes).unwrap();
    // A file beside the checkpoints that must never be reachable.
    std::fs::write(dir.join("secret"), b"secret").unwrap();
    let status = Status {
        checkpoints: vec![Checkpoint {
            id: ID.into(),
            round: 1,
            heldout_loss: 0.5,
            files: vec![CheckpointFile {
                name: FILE.into(),
                size: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            }],
        }],
        ..Status::default()
    };
    // The receiver keeps the last value after the sender is gone.
    let (_, rx) = watch::channel(status);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let credit: Vec<Contribution> = (0..2500u64)
        .map(|i| Contribution {
            peer: format!("peer-{i:04}"),
            accepted_shards: 1,
            tokens: 2500 - i,
            rejected: 0,
        })
        .collect();
    let (_, contributors) = watch::channel(Arc::new(credit));
    let app = router(rx, contributors, dir.to_path_buf());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bytes)
}

/// Runs curl with `args`, discarding the body; returns the HTTP status it saw.
async fn curl(args: Vec<String>) -> u16 {
    curl_to(Path::new("/dev/null"), args).await
}

/// Runs curl with `args`, writing the body to `out`; returns the HTTP status.
async fn curl_to(out: &Path, args: Vec<String>) -> u16 {
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let result = Command::new("curl")
            .args(["-sS", "-w", "%{http_code}", "-o"])
            .arg(&out)
            .args(&args)
            .output()
            .expect("curl is installed (.ci/run installs it)");
        String::from_utf8_lossy(&result.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn downloads_resume_and_partial_ranges_give_the_right_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, bytes) = serve(&tmp.path().join("checkpoints")).await;
    let url = format!("{base}/v1/checkpoints/{ID}/{FILE}");
    let etag = format!("\"{}\"", blake3::hash(&bytes).to_hex());

    let whole = tmp.path().join("whole");
    assert_eq!(curl_to(&whole, args(&[&url])).await, 200);
    assert_eq!(
        blake3::hash(&std::fs::read(&whole).unwrap()),
        blake3::hash(&bytes)
    );

    // curl -r: one range.
    let part = tmp.path().join("part");
    assert_eq!(curl_to(&part, args(&["-r", "1000-1999", &url])).await, 206);
    assert_eq!(std::fs::read(&part).unwrap(), &bytes[1000..2000]);

    // curl -C -: a download cut off after 70,001 bytes carries on where it stopped.
    let resumed = tmp.path().join("resumed");
    std::fs::write(&resumed, &bytes[..70_001]).unwrap();
    assert_eq!(curl_to(&resumed, args(&["-C", "-", &url])).await, 206);
    assert_eq!(
        blake3::hash(&std::fs::read(&resumed).unwrap()),
        blake3::hash(&bytes)
    );

    // The ETag is the blake3: a cache that has it hears 304.
    let inm = format!("If-None-Match: {etag}");
    assert_eq!(curl(args(&["-H", &inm, &url])).await, 304);
    // A resume against another version of the file gets the whole file.
    let stale = tmp.path().join("stale");
    let if_range = "If-Range: \"0000\"";
    assert_eq!(
        curl_to(&stale, args(&["-r", "10-", "-H", if_range, &url])).await,
        200
    );
    assert_eq!(std::fs::read(&stale).unwrap(), bytes);
    let fresh = format!("If-Range: {etag}");
    assert_eq!(
        curl_to(&stale, args(&["-r", "10-", "-H", &fresh, &url])).await,
        206
    );
    assert_eq!(std::fs::read(&stale).unwrap(), &bytes[10..]);
}

#[tokio::test]
async fn traversal_unknown_ids_bad_ranges_and_huge_headers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = serve(&tmp.path().join("checkpoints")).await;
    let url = format!("{base}/v1/checkpoints/{ID}/{FILE}");
    for path in [
        format!("/v1/checkpoints/{ID}/../../secret"),
        format!("/v1/checkpoints/{ID}/..%2F..%2Fsecret"),
        format!("/v1/checkpoints/{ID}/%2e%2e%2f%2e%2e%2fsecret"),
        "/v1/checkpoints/..%2F/secret".to_string(),
        "/v1/checkpoints/%2e%2e/secret".to_string(),
        "/v1/checkpoints/round-99999/adapter_model.safetensors".to_string(),
        format!("/v1/checkpoints/{ID}/nope.bin"),
    ] {
        let status = curl(args(&["--path-as-is", &format!("{base}{path}")])).await;
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    for range in [
        "bytes=200000-",
        "bytes=500-100",
        "bytes=abc",
        "bytes=0-1,5-9",
    ] {
        let status = curl(args(&["-H", &format!("Range: {range}"), &url])).await;
        assert_eq!(status, 416, "{range}");
    }
    // 1 MB of headers: refused before any handler runs.
    let headers = tmp.path().join("headers");
    let line = format!("X-Filler: {}\n", "a".repeat(8000));
    std::fs::write(&headers, line.repeat(128)).unwrap();
    let status = curl(args(&["-H", &format!("@{}", headers.display()), &url])).await;
    assert!((400..500).contains(&status), "oversized headers: {status}");
}

#[tokio::test]
async fn metrics_come_as_prometheus_text_or_openmetrics_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = serve(&tmp.path().join("checkpoints")).await;
    let url = format!("{base}/metrics");
    let text = tmp.path().join("text");
    assert_eq!(curl_to(&text, args(&[&url])).await, 200);
    let text = std::fs::read_to_string(text).unwrap();
    assert!(
        text.contains("herd_checkpoints 1\n") && !text.contains("# EOF"),
        "{text}"
    );
    let open = tmp.path().join("open");
    let accept = "Accept: application/openmetrics-text; version=1.0.0";
    assert_eq!(curl_to(&open, args(&["-H", accept, &url])).await, 200);
    let open = std::fs::read_to_string(open).unwrap();
    assert!(
        open.contains("herd_checkpoints 1\n") && open.ends_with("# EOF\n"),
        "{open}"
    );
}

#[tokio::test]
async fn contributors_come_a_page_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = serve(&tmp.path().join("checkpoints")).await;
    let page = |query: &str| {
        let out = tmp.path().join("page.json");
        let url = format!("{base}/v1/contributors{query}");
        async move {
            assert_eq!(curl_to(&out, vec![url]).await, 200);
            let list: Vec<Contribution> =
                serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
            list
        }
    };
    let first = page("").await;
    assert_eq!(first.len(), CONTRIBUTORS_PAGE_MAX);
    assert_eq!(first[0].peer, "peer-0000", "most tokens first");
    let last = page("?offset=2400").await;
    assert_eq!(last.len(), 100);
    assert_eq!(last[0].peer, "peer-2400");
    assert_eq!(page("?offset=10&limit=5").await.len(), 5);
    assert_eq!(page("?limit=100000").await.len(), CONTRIBUTORS_PAGE_MAX);
    assert!(page("?offset=9999").await.is_empty());
}
