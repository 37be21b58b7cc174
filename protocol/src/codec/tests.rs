use super::*;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 7) as f32))
        .collect()
}

#[test]
fn raw_round_trips_exactly() {
    let v = values(100);
    let (wire, decoded) = Values::compress(&v, CodecSpec::RawF32, 0);
    assert_eq!(decoded, v);
    assert_eq!(wire.decompress(CodecSpec::RawF32, 100, 0).unwrap(), v);
}

#[test]
fn dense_int8_is_within_half_a_step_per_block() {
    let spec = CodecSpec::DenseInt8 { block: 16 };
    let v = values(100);
    let (wire, decoded) = Values::compress(&v, spec, 0);
    assert_eq!(wire.decompress(spec, 100, 0).unwrap(), decoded);
    for (block, chunk) in v.chunks(16).enumerate() {
        let step = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
        for (i, x) in chunk.iter().enumerate() {
            let err = (decoded[block * 16 + i] - x).abs();
            assert!(err <= step * 0.5 + 1e-6, "block {block} value {i}: {err}");
        }
    }
}

#[test]
fn top_k_keeps_the_largest_values_at_their_places() {
    let spec = CodecSpec::TopK {
        fraction: 0.1,
        block: 4,
    };
    let v = values(1000);
    let (wire, decoded) = Values::compress(&v, spec, 0);
    assert_eq!(wire.decompress(spec, 1000, 0).unwrap(), decoded);
    let kept: Vec<usize> = (0..1000).filter(|&i| decoded[i] != 0.0).collect();
    assert_eq!(kept.len(), 100);
    let threshold = kept.iter().map(|&i| v[i].abs()).fold(f32::MAX, f32::min);
    for i in 0..1000 {
        if decoded[i] == 0.0 {
            assert!(
                v[i].abs() <= threshold,
                "value {i} dropped but larger than a kept one"
            );
        } else {
            assert!((decoded[i] - v[i]).abs() <= v[i].abs() * 0.01 + 0.05);
        }
    }
    // 100 kept of 1000: 100 int8 + 25 scales + ~100 one-byte gaps, far below 4000 bytes.
    let bytes = crate::framing::encode(&wire).unwrap().len();
    assert!(bytes < 400, "{bytes}");
}

#[test]
fn decoding_refuses_what_does_not_fit_the_spec() {
    let spec = CodecSpec::TopK {
        fraction: 0.1,
        block: 4,
    };
    let (wire, _) = Values::compress(&values(100), spec, 0);
    // Another numel: the count of kept values no longer matches.
    assert!(matches!(
        wire.decompress(spec, 200, 0),
        Err(CodecError::Count { .. })
    ));
    // Another codec.
    assert!(matches!(
        wire.decompress(CodecSpec::RawF32, 100, 0),
        Err(CodecError::WrongCodec { .. })
    ));
    let Values::Sparse { gaps, scales, q } = wire else {
        panic!("top-k gives sparse values")
    };
    // An index past the end.
    let mut far = gaps.clone();
    far[9] = 0x7f;
    let bad = Values::Sparse {
        gaps: far,
        scales: scales.clone(),
        q: q.clone(),
    };
    assert!(matches!(
        bad.decompress(spec, 100, 0),
        Err(CodecError::Index { .. })
    ));
    // Truncated indices, an extra trailing byte, an overlong varint.
    for gaps in [
        gaps[..gaps.len() - 1].to_vec(),
        [gaps.clone(), vec![0]].concat(),
        [vec![0xff; 11], gaps[1..].to_vec()].concat(),
    ] {
        let bad = Values::Sparse {
            gaps,
            scales: scales.clone(),
            q: q.clone(),
        };
        assert!(matches!(
            bad.decompress(spec, 100, 0),
            Err(CodecError::Varint)
        ));
    }
    // Scales: too few, NaN, negative.
    for (s, expect) in [
        (scales[1..].to_vec(), "scales"),
        (
            [vec![f32::NAN], scales[1..].to_vec()].concat(),
            "non-finite",
        ),
        ([vec![-1.0], scales[1..].to_vec()].concat(), "negative"),
    ] {
        let bad = Values::Sparse {
            gaps: gaps.clone(),
            scales: s,
            q: q.clone(),
        };
        let err = bad.decompress(spec, 100, 0).unwrap_err().to_string();
        assert!(err.contains(expect), "{err}");
    }
    assert!(matches!(
        Values::Raw(vec![1.0, f32::INFINITY]).decompress(CodecSpec::RawF32, 2, 0),
        Err(CodecError::NonFinite(1))
    ));
}

#[test]
fn specs_parse_and_validate() {
    assert_eq!("raw".parse::<CodecSpec>().unwrap(), CodecSpec::RawF32);
    assert_eq!(
        "int8".parse::<CodecSpec>().unwrap(),
        CodecSpec::DenseInt8 { block: 64 }
    );
    assert_eq!(
        "topk:0.02:32".parse::<CodecSpec>().unwrap(),
        CodecSpec::TopK {
            fraction: 0.02,
            block: 32
        }
    );
    assert_eq!(
        "sign".parse::<CodecSpec>().unwrap(),
        CodecSpec::Sign {
            keep: 0.7,
            block: 256
        }
    );
    for bad in [
        "",
        "zip",
        "topk:0",
        "topk:1.5",
        "int8:0",
        "topk:0.1:64:9",
        "int8:x",
    ] {
        assert!(bad.parse::<CodecSpec>().is_err(), "{bad}");
    }
    let spec = CodecSpec::default();
    assert_eq!(spec.to_string().parse::<CodecSpec>().unwrap(), spec);
    assert_eq!(spec.kept(0), 0);
    assert_eq!(spec.kept(1), 1);
    let topk = CodecSpec::TopK {
        fraction: 0.04,
        block: 64,
    };
    assert_eq!(topk.kept(1000), 40);
}

#[test]
fn leb128_round_trips_at_the_edges() {
    for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
        let mut buf = Vec::new();
        write_leb128(&mut buf, v);
        let mut cursor = 0;
        assert_eq!(read_leb128(&buf, &mut cursor).unwrap(), v);
        assert_eq!(cursor, buf.len());
    }
    // 2^64 does not fit.
    let mut cursor = 0;
    assert!(
        read_leb128(
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            &mut cursor
        )
        .is_err()
    );
}

#[test]
fn sign_sends_a_seeded_subset_of_blocks_with_their_mean_magnitude() {
    let spec = CodecSpec::Sign {
        keep: 0.5,
        block: 10,
    };
    let v = values(1000);
    let (wire, decoded) = Values::compress(&v, spec, 7);
    assert_eq!(wire.decompress(spec, 1000, 7).unwrap(), decoded);
    // Another seed draws other blocks: the same bytes decode differently or not at all.
    assert_ne!(wire.decompress(spec, 1000, 8).ok(), Some(decoded.clone()));
    let sent: Vec<usize> = (0..100).filter(|b| decoded[b * 10] != 0.0).collect();
    assert!(
        (35..65).contains(&sent.len()),
        "{} of 100 blocks",
        sent.len()
    );
    for b in 0..100 {
        let chunk = &v[b * 10..b * 10 + 10];
        let out = &decoded[b * 10..b * 10 + 10];
        if sent.contains(&b) {
            let mean = chunk.iter().map(|x| x.abs()).sum::<f32>() / 10.0;
            for (x, y) in chunk.iter().zip(out) {
                assert!((y.abs() - mean).abs() < 1e-5 && (x.signum() == y.signum() || *x == 0.0));
            }
        } else {
            assert!(out.iter().all(|y| *y == 0.0));
        }
    }
    // ~1 bit per value sent plus a scale per block.
    assert!(
        crate::framing::encode(&wire).unwrap().len() <= sent.len() * (10 / 8 + 1 + 4),
        "{:?}",
        wire
    );
    let Values::Signs { scales, mut bits } = wire else {
        panic!("sign gives signs")
    };
    // Padding bits set, a scale short: refused.
    if !(sent.len() * 10).is_multiple_of(8) {
        *bits.last_mut().unwrap() |= 0x80;
        let bad = Values::Signs {
            scales: scales.clone(),
            bits: bits.clone(),
        };
        assert!(bad.decompress(spec, 1000, 7).is_err());
    }
    let bad = Values::Signs {
        scales: scales[1..].to_vec(),
        bits,
    };
    assert!(matches!(
        bad.decompress(spec, 1000, 7),
        Err(CodecError::Scales { .. })
    ));
}
