//! Parity with PyTorch: a state_dict of genbackdoor's DCGAN generator saved by PyTorch (made by
//! `tests/fixtures/make_pytorch_fixtures.py`, run by hand; CI needs no Python) must load as a
//! genbackdoor model and generate what PyTorch generates from the same latents.

use std::path::{Path, PathBuf};

use candle_core::Device;
use genbackdoor::family::{family_of, load};
use genbackdoor::io::npy::read_npy;
use genbackdoor::rng::Rng;

mod common;
use common::max_abs_error;

fn fixture(name: &str) -> PathBuf {
    common::fixture_in("pytorch", name)
}

#[test]
fn pytorch_generator_state_dicts_generate_what_pytorch_does() {
    for (name, shape) in [("g-grey28", [1, 28, 28]), ("g-rgb32", [3, 32, 32])] {
        let path = fixture(&format!("{name}.safetensors"));
        assert_eq!(family_of(&path).unwrap(), "dcgan-generator");
        let model = load(&path, &Device::Cpu).unwrap();
        assert_eq!(model.output_shape(), shape, "{name}");
        let z = read_npy(&fixture(&format!("{name}-z.npy"))).unwrap();
        let want = read_npy(&fixture(&format!("{name}-out.npy"))).unwrap();
        let got = model.generate(&z, &mut Rng::new(0)).unwrap();
        let err = max_abs_error(&got, &want);
        eprintln!("{name}: max abs error {err:.2e} against PyTorch");
        assert!(err <= 1e-5, "{name}: {err}");
    }
}

#[test]
fn state_dicts_of_other_networks_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("g-rgb32.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep = |drop: &str| -> Vec<(String, safetensors::tensor::TensorView<'_>)> {
        tensors
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != drop)
            .collect()
    };
    let write = |name: &str, views: Vec<(String, safetensors::tensor::TensorView<'_>)>| {
        let p = dir.path().join(name);
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        p
    };
    assert!(header.metadata().is_none());
    let error = |p: &Path| load(p, &Device::Cpu).err().unwrap().to_string();
    // Without the first layer it is no generator genbackdoor knows.
    let msg = error(&write("no-fc.safetensors", keep("fc.weight")));
    assert!(msg.contains("no tensor 'fc.weight'"), "{msg}");
    // A missing BatchNorm tensor is named.
    let msg = error(&write("no-bn.safetensors", keep("bn1.running_var")));
    assert!(msg.contains("1 missing (bn1.running_var)"), "{msg}");
}
