//! One integration-test binary (one link, shared helpers); each module is one concern.

/// BERT with all-MiniLM-L6-v2's weights, tokenizers, safetensors checkpoints.
mod bert;
/// Checkpoints: damaged saves passed over, pruning, the folder lock, kills mid-save.
mod checkpoints;
/// The binary: `plan` and `train` as a user runs them.
mod cli;
/// Our ViT and CLIP text towers against candle-transformers' CLIP.
mod clip_reference;
/// Thread-backend collectives against serial computations; failing ranks give errors.
mod collectives;
/// Tiny model, topologies and tolerance helpers shared by the modules below.
mod common;
/// The data pipeline on real photos: shards, order, transforms, bad input, resume.
mod data;
/// Fused CPU ops (GELU, softmax, layer norm, bias) against plain candle ops.
mod fused;
/// Every parser of outside input against arbitrary and mutated input (proptest).
mod fuzz;
/// The autograd reference against finite differences: every parameter's gradient.
mod gradients;
/// The fused CUDA kernels on a CPU emulator, launched by their plans, against formulas.
mod kernels;
/// CLIP and SigLIP across groups, both exchange schemes, tiled: against one device.
mod losses;
/// Parameters and FLOPs from the configs against published figures.
mod model_sizes;
/// Ranks as processes under mpirun: collectives, losses, launch script, a killed rank.
#[cfg(feature = "mpi")]
mod mpi;
/// The NCCL backend on one GPU (single-rank communicators): needs a CUDA GPU.
#[cfg(feature = "cuda")]
mod nccl;
/// OpenCLIP's own state_dict and outputs, loaded and reproduced.
mod openclip;
/// `mmpipe eval` on an OpenCLIP state_dict against clip_benchmark's scores; CSV sets.
mod openclip_eval;
/// AdamW against the textbook update.
mod optim;
/// The split loss and training on 1x1 .. 3x1 ranks against one device on the whole batch.
mod parity;
/// `mmpipe plan`: placement and bytes per step.
mod plan;
/// The cost model, the split search, JSON and errors.
mod planner;
/// bf16 mixed precision against f32: steps, gradient sums, the planner's memory, resume.
mod precision;
/// Launcher variables (torchrun, Slurm) and the TCP rendezvous: agreement, refusals,
/// time-outs.
mod rendezvous;
/// The modified ResNet: gradients and real size.
mod resnet;
/// Topology files: the shipped ones parse, broken ones name file and field.
mod topology_files;
/// The embedded default run learns: retrieval far above chance.
mod training;
/// Zero-shot classification of a labelled image folder: scores, CLI, bad input.
mod zero_shot;
