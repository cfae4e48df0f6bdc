//! SSIM against scikit-image: `tests/fixtures/ssim.json` holds image pairs (grey 28×28 and
//! RGB 32×32) with `skimage.metrics.structural_similarity`'s value for each, made by
//! `tests/fixtures/make_ssim_fixture.py` (see there for the settings). A wrong window, σ,
//! constant, value range or channel handling moves these values by far more than 1e-6.

use genbackdoor::metrics::ssim;

#[test]
fn ssim_matches_scikit_image() {
    let text = include_str!("fixtures/ssim.json");
    let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for case in cases {
        let (a, b) = (floats(&case["a"]), floats(&case["b"]));
        let width = case["shape"][2].as_u64().unwrap() as usize;
        let want = case["ssim"].as_f64().unwrap();
        let got = ssim(&a, &b, width);
        eprintln!("{}: ours {got:.8}, scikit-image {want:.8}", case["name"]);
        assert!(
            (got - want).abs() < 1e-6,
            "{}: {got} vs {want}",
            case["name"]
        );
    }
}
