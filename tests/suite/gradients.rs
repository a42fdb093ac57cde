//! The single-device reference is only a reference if its autograd is right: candle's fused
//! ops drop gradients silently. Central finite differences in f64 check every parameter.

use candle_core::{DType, Tensor};
use mmpipe::data::SyntheticSource;

use super::common::{batch, scalar, test_model, values, Reference};

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let cfg = test_model();
    let reference = Reference::new(&cfg, 3, DType::F64);
    let source = SyntheticSource::new(3, &cfg).unwrap();
    let (images, texts) = batch(&source, &[0, 1, 2, 3, 4], DType::F64);
    let (_, grads) = reference.grads(&images, &texts);
    let h = 1e-5;
    let mut checked = 0;
    for (name, var) in reference.params.iter() {
        let g = values(&grads[name]);
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{name}: the gradient is all zero"
        );
        // The largest entry, and two more spread over the tensor.
        let largest = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for idx in [largest, g.len() / 3, (7 * g.len()) / 9] {
            let original = var.as_tensor().copy().unwrap();
            let at = |delta: f64| {
                let mut w = values(&original);
                w[idx] += delta;
                var.set(&Tensor::from_vec(w, original.shape(), original.device()).unwrap())
                    .unwrap();
                scalar(&reference.loss(&images, &texts))
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&original).unwrap();
            assert!(
                (fd - g[idx]).abs() <= 1e-7 + 1e-4 * g[idx].abs(),
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 30, "only {checked} entries checked");
}
