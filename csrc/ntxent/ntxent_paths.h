// Counters of the code paths the contrastive kernels take (host only). Tests assert on them that a call
// really ran the path it was meant to (the symmetric backward, the kept-probabilities forward, ...);
// simclr_ext.ops.ntxent_path_counts() reads them. Counting is one relaxed atomic add per call.
#pragma once

#include <cstdint>
#include <string>

namespace simclr_ext {
namespace ntxent {

enum class Path : int {
  kCpuForwardStreamed,        // online log-sum-exp over key tiles
  kCpuForwardKept,            // full rows, softmax probabilities kept for the backward
  kCpuBackwardSymmetric,      // q is k: one pass, tiles recomputed once, H = dS + dS^T
  kCpuBackwardSymmetricKept,  // q is k: one pass over the kept probabilities
  kCpuBackwardGeneral,        // dq pass + dk pass, tiles recomputed
  kCpuBackwardGeneralKept,    // dq pass + dk pass over the kept probabilities
  kCudaForward,
  kCudaBackwardSymmetric,
  kCudaBackwardGeneral,
  kCpuForwardTwoWay,    // CLIP: query rows' and key columns' log-sum-exps from the same tiles
  kCpuBackwardTwoWay,   // CLIP: one pass, tiles recomputed once, multiplied for dq and dk
  kCudaForwardTwoWay,   // the forward kernel once per direction
  kCudaBackwardTwoWay,  // dQ and dK passes with both sides' factors
  kCount
};

// The gradient products a backward call ran, per backend: dq (the queries' rows; the symmetric pass, which
// gives the one input's whole gradient, counts here) and dk (the keys' rows). A backward whose output mask
// leaves grad_k out (keys detached: a queue, MoCo's k = q.detach()) runs no dk product; one that needs
// neither grad_q nor the temperature's gradient runs no dq product.
enum class Pass : int { kCpuDq, kCpuDk, kCudaDq, kCudaDk, kCount };

void count_path(Path path);
void count_pass(Pass pass);
// "name=count;name=count;..." in the order of Path / Pass.
std::string path_counts();
std::string pass_counts();
// Resets both the path and the pass counters.
void reset_path_counts();

}  // namespace ntxent
}  // namespace simclr_ext
