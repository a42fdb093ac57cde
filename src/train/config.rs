//! Training settings. The full config file (optimizer groups, data, checkpoints) grows in
//! later work; today the knobs of the synthetic run, each settable from the CLI.

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub steps: usize,
    pub global_batch: usize,
    /// Peak learning rate, reached after `warmup` steps, then cosine decay to 0.
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Held-out pairs for the final retrieval evaluation (0: skip it).
    pub eval_pairs: usize,
    /// Show a progress bar on world rank 0.
    pub progress: bool,
    /// Gradient checkpointing per block: keep block inputs, recompute in backward.
    pub checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            steps: 400,
            global_batch: 128,
            lr: 2e-3,
            warmup: 40,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            eval_pairs: 256,
            progress: true,
            checkpointing: false,
        }
    }
}
