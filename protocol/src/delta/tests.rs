use super::*;
use crate::sketch::agreement;

fn layout() -> DeltaLayout {
    DeltaLayout(vec![("a".into(), vec![20, 10]), ("b".into(), vec![300])])
}

fn delta() -> Delta {
    let wave = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect();
    Delta {
        tensors: vec![
            DeltaTensor {
                name: "a".into(),
                shape: vec![20, 10],
                values: wave(200, 0.3),
            },
            DeltaTensor {
                name: "b".into(),
                shape: vec![300],
                values: wave(300, 0.7),
            },
        ],
    }
}

fn payload_with(edit: impl FnOnce(&mut Payload)) -> Vec<u8> {
    let bytes = delta().encode(CodecSpec::RawF32, None, 1).unwrap().payload;
    let mut p: Payload = decode::<_, MAX_DELTA_BYTES>(&bytes).unwrap();
    edit(&mut p);
    encode(&p).unwrap()
}

#[test]
fn every_codec_round_trips_within_its_error() {
    for (codec, max_err) in [
        (CodecSpec::RawF32, 0.0),
        (CodecSpec::DenseInt8 { block: 64 }, 0.005),
        (
            CodecSpec::TopK {
                fraction: 0.04,
                block: 64,
            },
            1.0,
        ),
        (CodecSpec::default(), 1.0),
    ] {
        let fb = delta().encode(codec, None, 9).unwrap();
        let decoded = Delta::decode(&fb.payload, &layout(), codec, 9).unwrap();
        for (t, orig) in decoded.delta.tensors.iter().zip(&delta().tensors) {
            assert_eq!((&t.name, &t.shape), (&orig.name, &orig.shape));
            for (a, b) in t.values.iter().zip(&orig.values) {
                assert!((a - b).abs() <= max_err, "{codec}: {a} vs {b}");
            }
        }
        // The sketch is of the uncompressed delta, whatever the codec.
        let a = agreement(&decoded.sketch, &delta().sketch(9));
        assert!(a.rel_error < 0.01, "{codec}: {a:?}");
    }
}

#[test]
fn error_feedback_keeps_what_did_not_travel() {
    let codec = CodecSpec::TopK {
        fraction: 0.1,
        block: 64,
    };
    let d = delta();
    let first = d.encode(codec, None, 1).unwrap();
    let residual = first.residual_if_accepted();
    let sent = Delta::decode(&first.payload, &layout(), codec, 1)
        .unwrap()
        .delta;
    // sent + residual == Δ, value by value.
    for ((s, r), t) in sent.tensors.iter().zip(&residual).zip(&d.tensors) {
        for ((s, r), v) in s.values.iter().zip(r).zip(&t.values) {
            assert!((s + r - v).abs() < 1e-6);
        }
    }
    // Next time the residual is added; sent over both rounds + the last residual == 2Δ.
    let second = d.encode(codec, Some(&residual), 2).unwrap();
    let sent2 = Delta::decode(&second.payload, &layout(), codec, 2)
        .unwrap()
        .delta;
    let residual2 = second.clone().residual_if_accepted();
    for (i, r2) in residual2.iter().enumerate() {
        for (j, r2) in r2.iter().enumerate() {
            let total = sent.tensors[i].values[j] + sent2.tensors[i].values[j] + r2;
            assert!((total - 2.0 * d.tensors[i].values[j]).abs() < 1e-5);
        }
    }
    // Rejected: nothing was applied and the shard goes to someone else; the old residual stays.
    assert_eq!(second.residual_if_rejected(), residual);
    assert!(first.clone().residual_if_rejected().is_empty());
    // A residual of another layout is ignored rather than misapplied.
    let other = d.encode(codec, Some(&[vec![1.0; 3]]), 1).unwrap();
    assert_eq!(other.payload, first.payload);
}

#[test]
fn decoding_checks_size_codec_count_values_and_sketch() {
    let codec = CodecSpec::RawF32;
    let ok = delta().encode(codec, None, 1).unwrap().payload;
    assert!(Delta::decode(&ok, &layout(), codec, 1).is_ok());
    // Over the layout's cap.
    let big = vec![0u8; layout().payload_cap() + 1];
    assert!(matches!(
        Delta::decode(&big, &layout(), codec, 1),
        Err(DeltaError::TooLarge { .. })
    ));
    // Another codec than the run's.
    assert!(matches!(
        Delta::decode(&ok, &layout(), CodecSpec::default(), 1),
        Err(DeltaError::Codec(_))
    ));
    // A tensor too few.
    let short = payload_with(|p| {
        p.tensors.pop();
    });
    assert!(matches!(
        Delta::decode(&short, &layout(), codec, 1),
        Err(DeltaError::Count { .. })
    ));
    // Wrong number of values for a tensor's shape.
    let wrong = payload_with(|p| p.tensors[1] = Values::Raw(vec![0.5; 299]));
    let err = Delta::decode(&wrong, &layout(), codec, 1).unwrap_err();
    assert!(err.to_string().contains("tensor `b`"), "{err}");
    // NaN.
    let nan = payload_with(|p| p.tensors[0] = Values::Raw(vec![f32::NAN; 200]));
    assert!(
        Delta::decode(&nan, &layout(), codec, 1)
            .unwrap_err()
            .is_non_finite()
    );
    // A sketch of the wrong length.
    let sketch = payload_with(|p| p.sketch = Values::compress(&[1.0; 3], SKETCH_CODEC, 0).0);
    assert!(matches!(
        Delta::decode(&sketch, &layout(), codec, 1),
        Err(DeltaError::Sketch(_))
    ));
}

#[test]
fn compression_ratio_at_default_settings() {
    // A layout the size of the embedded default's adapter: 4 layers × (q, o: 64×8; k, v: 32×8).
    let mut tensors = Vec::new();
    for layer in 0..4 {
        for (t, rows) in [("q", 64), ("k", 32), ("v", 32), ("o", 64)] {
            tensors.push(DeltaTensor {
                name: format!("{layer}.{t}"),
                shape: vec![rows, 8],
                values: (0..rows * 8)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) * 1e-3)
                    .collect(),
            });
        }
    }
    let d = Delta { tensors };
    let bytes = d
        .encode(CodecSpec::default(), None, 3)
        .unwrap()
        .payload
        .len() as u64;
    let ratio = d.dense_fp32_bytes() as f64 / bytes as f64;
    assert!(
        ratio >= 32.0,
        "{bytes} bytes, {ratio:.1}× smaller than fp32"
    );
}
