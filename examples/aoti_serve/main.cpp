// Serves a DeepFM exported by deepfm_fast from C++, without Python: loads the deepfm_fast op
// library (the package calls its fused ops), loads the AOTInductor package, predicts a batch,
// compares it with Python's predictions and, with --bench N, times N batches.
//
//   aoti_serve MODEL.pt2 IDS.bin NUM_FIELDS [EXPECTED.bin] [--ops-library PATH] [--bench N]
//
// IDS.bin: int64 [B, NUM_FIELDS] local ids, row-major; EXPECTED.bin: float32 [B] probabilities.
// The op library defaults to libdeepfm_fast_ops.so beside this program (both built by
// CMakeLists.txt here; see README.md, "Serving").
#include <dlfcn.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

std::string beside_this_program(const std::string& name) {
  std::vector<char> buf(4096);
  ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  std::string exe = n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string("./aoti_serve");
  return exe.substr(0, exe.find_last_of('/') + 1) + name;
}

int usage() {
  std::cerr << "usage: aoti_serve MODEL.pt2 IDS.bin NUM_FIELDS [EXPECTED.bin] [--ops-library PATH] [--bench N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string ops_library = beside_this_program("libdeepfm_fast_ops.so");
  int bench = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--ops-library" && i + 1 < argc) {
      ops_library = argv[++i];
    } else if (arg == "--bench" && i + 1 < argc) {
      bench = std::atoi(argv[++i]);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 3 || positional.size() > 4) return usage();
  try {
    // The package calls torch.ops.deepfm_fast.* through the dispatcher: loading the library runs
    // its operator registrations. Without it, loading the package fails naming the missing op.
    if (dlopen(ops_library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::cerr << "aoti_serve: cannot load the deepfm_fast op library " << ops_library << ": " << dlerror() << "\n";
      return 1;
    }
    const int64_t num_fields = std::stoll(positional[2]);
    std::vector<char> raw = read_file(positional[1]);
    if (num_fields < 1 || raw.size() % (sizeof(int64_t) * num_fields) != 0) {
      std::cerr << "aoti_serve: " << positional[1] << " does not hold int64 [B, " << num_fields << "] ids\n";
      return 1;
    }
    const int64_t batch = static_cast<int64_t>(raw.size() / (sizeof(int64_t) * num_fields));
    at::Tensor ids = at::from_blob(raw.data(), {batch, num_fields}, at::kLong).clone();

    torch::inductor::AOTIModelPackageLoader loader(positional[0]);
    at::Tensor probs = loader.run({ids})[0];
    std::printf("predicted %lld rows; first: %.6f\n", static_cast<long long>(batch), probs[0].item<float>());

    if (positional.size() == 4) {
      std::vector<char> expected_raw = read_file(positional[3]);
      if (expected_raw.size() != sizeof(float) * batch) {
        std::cerr << "aoti_serve: " << positional[3] << " does not hold float32 [" << batch << "]\n";
        return 1;
      }
      at::Tensor expected = at::from_blob(expected_raw.data(), {batch}, at::kFloat);
      double diff = (probs - expected).abs().max().item<double>();
      std::printf("max |C++ - Python| = %.3g\n", diff);
      if (!(diff <= 1e-5)) {
        std::cerr << "aoti_serve: the C++ predictions differ from Python's\n";
        return 1;
      }
    }
    if (bench > 0) {
      loader.run({ids});  // warm-up
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < bench; ++i) loader.run({ids});
      double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("bench: %d batches of %lld rows, %.1f rows/s\n", bench, static_cast<long long>(batch),
                  bench * batch / seconds);
    }
  } catch (const std::exception& error) {
    std::cerr << "aoti_serve: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
