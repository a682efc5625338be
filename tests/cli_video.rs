//! The `chitu` binary on the embedded model: files written, MP4 decodable with the right frames.

use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use std::path::Path;

mod common;
use common::generate;

/// Decodes every sample of the MP4's video track; returns (frames decoded, width, height).
fn decode_mp4(path: &Path) -> (usize, usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut reader = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size).unwrap();
    let (id, w, h, sps, pps) = {
        let (id, track) = reader.tracks().iter().next().unwrap();
        let avc = &track.trak.mdia.minf.stbl.stsd.avc1.as_ref().unwrap().avcc;
        let sets = (
            avc.sequence_parameter_sets[0].bytes.clone(),
            avc.picture_parameter_sets[0].bytes.clone(),
        );
        (*id, track.width() as usize, track.height() as usize, sets.0, sets.1)
    };
    let annex_b = |nal: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    };
    let mut decoder = Decoder::new().unwrap();
    let mut decoded = 0;
    for i in 1..=reader.sample_count(id).unwrap() {
        let sample = reader.read_sample(id, i).unwrap().unwrap();
        let mut packet = Vec::new();
        if i == 1 {
            annex_b(&sps, &mut packet);
            annex_b(&pps, &mut packet);
        }
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            annex_b(&rest[4..4 + n], &mut packet);
            rest = &rest[4 + n..];
        }
        if let Some(frame) = decoder.decode(&packet).unwrap() {
            assert_eq!(frame.dimensions(), (w, h));
            decoded += 1;
        }
    }
    decoded += decoder.flush_remaining().unwrap().len();
    (decoded, w, h)
}

#[test]
fn generate_on_the_embedded_model_writes_a_playable_video() {
    let out = tempfile::tempdir().unwrap();
    let args = ["--prompt", "A cat walking on grass", "--seed", "3", "--steps", "4"];
    let run = generate(&[&args[..], &["--png-frames"]].concat(), out.path());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stem = "a_cat_walking_on_grass_seed3_step4";
    let printed = String::from_utf8_lossy(&run.stdout);
    for ext in ["mp4", "png", "json"] {
        let p = out.path().join(format!("{stem}.{ext}"));
        assert!(p.exists(), "missing {}", p.display());
        assert!(printed.contains(&p.display().to_string()));
    }
    assert!(out.path().join(format!("{stem}_0008.png")).exists());
    assert_eq!(decode_mp4(&out.path().join(format!("{stem}.mp4"))), (9, 64, 64));

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(format!("{stem}.json"))).unwrap()).unwrap();
    assert_eq!(sidecar["params"]["seed"], 3);
    assert!(sidecar["timings_s"]["denoise"].as_f64().unwrap() > 0.0);

    // The same seed gives the same video bytes.
    let again = tempfile::tempdir().unwrap();
    let run2 = generate(&args, again.path());
    assert!(run2.status.success());
    assert_eq!(
        std::fs::read(out.path().join(format!("{stem}.mp4"))).unwrap(),
        std::fs::read(again.path().join(format!("{stem}.mp4"))).unwrap()
    );
}

#[test]
fn bad_requests_fail_before_work_with_a_message() {
    let out = tempfile::tempdir().unwrap();
    for (flag, value, needle) in [
        ("--frames", "6", "4k+1"),
        ("--height", "40", "16"),
        ("--steps", "0", "steps"),
        ("--solver", "heun", "solver"),
    ] {
        let run = generate(&["--prompt", "x", flag, value], out.path());
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
