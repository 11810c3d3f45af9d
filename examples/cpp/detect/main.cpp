// Landmarks of grey BMP images with a detector exported by `coorkern export`, from C++:
//
//   coorkern_detect MODEL IMAGE [IMAGE...] [--threads N]
//
// MODEL is a `--format pt2` package (AOTInductor, a file ending in .pt2) or a
// `--format torchscript` file (anything else).  The exported module takes the image
// resized to the model's input size and returns (coords, confidence, logits), coords in
// the model's pixels; this program does what `coorkern predict` does around the network:
// the antialiased bilinear resize, and the mapping back to the image's own pixels with the
// pixel-centre convention x_image = (x + 0.5) * W_image / W - 0.5.  It prints the
// landmarks as `coorkern predict --format csv` does (its image, landmark, x, y and
// confidence columns).  The model runs on the device it was exported for (CPU, or CUDA).
//
// The exported graph calls torch.ops.coorkern.*, which resolve because the program links
// coorkern::ops (the target keeps libcoorkern_ops.so loaded; docs/cpp.md).  Any error --
// a missing file, an unsupported image, a model of the wrong kind -- is one line on
// stderr and exit status 1 (2 for a usage error).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/serialization/import.h>
#ifdef COORKERN_DETECT_PT2
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "bmp.h"

namespace {

constexpr const char* kArtefactFormat = "coorkern-detector-v1";  // coorkern.engine.export.ARTEFACT_FORMAT
constexpr const char* kMetadataFile = "coorkern.txt";             // coorkern.engine.export.METADATA_FILE

using Metadata = std::unordered_map<std::string, std::string>;

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

struct Outputs {
  at::Tensor coords;      // (1, L, 2) x, y in the model's pixels
  at::Tensor confidence;  // (1, L)
};

// The exported detector, whichever format it came in.
class Detector {
 public:
  virtual ~Detector() = default;
  virtual Outputs run(const at::Tensor& image) = 0;
  const Metadata& metadata() const { return metadata_; }

 protected:
  Metadata metadata_;
};

Outputs outputs_of(const std::vector<at::Tensor>& outputs, const std::string& path) {
  if (outputs.size() != 3) {
    throw std::runtime_error(path + ": the model returned " + std::to_string(outputs.size()) +
                             " outputs, expected (coords, confidence, logits)");
  }
  return {outputs[0].to(at::kCPU, at::kFloat), outputs[1].to(at::kCPU, at::kFloat)};
}

class TorchScriptDetector : public Detector {
 public:
  TorchScriptDetector(const std::string& path) : path_(path) {
    torch::jit::ExtraFilesMap extra{{kMetadataFile, ""}};
    try {
      module_ = torch::jit::load(path, c10::nullopt, extra);
    } catch (const c10::Error& e) {
      throw std::runtime_error(path + ": not a TorchScript model (" + first_line(e.what_without_backtrace()) +
                               "); export one with `coorkern export --format torchscript`");
    }
    std::istringstream lines(extra[kMetadataFile]);
    for (std::string line; std::getline(lines, line);) {
      const auto eq = line.find('=');
      if (eq != std::string::npos) metadata_[line.substr(0, eq)] = line.substr(eq + 1);
    }
    module_.eval();
  }

  Outputs run(const at::Tensor& image) override {
    const auto result = module_.forward({image});
    if (!result.isTuple()) throw std::runtime_error(path_ + ": the model does not return a tuple of tensors");
    std::vector<at::Tensor> tensors;
    for (const auto& value : result.toTupleRef().elements()) tensors.push_back(value.toTensor());
    return outputs_of(tensors, path_);
  }

 private:
  std::string path_;
  torch::jit::Module module_;
};

#ifdef COORKERN_DETECT_PT2
class PackageDetector : public Detector {
 public:
  PackageDetector(const std::string& path) : path_(path) {
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      metadata_ = loader_->get_metadata();
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": not a loadable AOTInductor package (" +
                               first_line(error_text(e)) +
                               "); export one with `coorkern export --format pt2` on this machine's torch");
    }
  }

  Outputs run(const at::Tensor& image) override { return outputs_of(loader_->run({image}), path_); }

 private:
  static std::string error_text(const std::exception& e) {
    if (const auto* error = dynamic_cast<const c10::Error*>(&e)) return error->what_without_backtrace();
    return e.what();
  }

  std::string path_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};
#endif

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::unique_ptr<Detector> load_detector(const std::string& path) {
  if (!std::ifstream(path).good()) throw std::runtime_error(path + ": model file not found or unreadable");
  if (ends_with(path, ".pt2")) {
#ifdef COORKERN_DETECT_PT2
    return std::make_unique<PackageDetector>(path);
#else
    throw std::runtime_error(path + ": this build cannot load .pt2 packages (its libtorch has no AOTInductor "
                             "package loader); export with --format torchscript");
#endif
  }
  return std::make_unique<TorchScriptDetector>(path);
}

std::string required(const Metadata& metadata, const std::string& key, const std::string& path) {
  const auto found = metadata.find(key);
  if (found == metadata.end()) throw std::runtime_error(path + ": the model's metadata lacks " + key);
  return found->second;
}

// The model's input size (H, W) and device, checked against what this program feeds it.
struct ModelInput {
  int64_t height = 0, width = 0;
  at::Device device = at::kCPU;
};

ModelInput check_metadata(const Metadata& metadata, const std::string& path) {
  const auto tag = metadata.find("coorkern_format");
  if (tag == metadata.end() || tag->second != kArtefactFormat) {
    throw std::runtime_error(path + ": not a coorkern detector export (no '" + std::string(kArtefactFormat) +
                             "' metadata); write one with `coorkern export --format torchscript|pt2`");
  }
  if (required(metadata, "batch_size", path) != "1") {
    throw std::runtime_error(path + ": exported for batches of " + metadata.at("batch_size") +
                             "; this program feeds one image at a time (export with --batch-size 1)");
  }
  if (required(metadata, "in_channels", path) != "1") {
    throw std::runtime_error(path + ": the model takes " + metadata.at("in_channels") +
                             " channels; this program reads grey images (1 channel)");
  }
  ModelInput input;
  input.height = std::stoll(required(metadata, "image_height", path));
  input.width = std::stoll(required(metadata, "image_width", path));
  if (required(metadata, "device", path) == "cuda") {
    if (!at::hasCUDA()) throw std::runtime_error(path + ": exported for CUDA, and there is no CUDA device here");
    input.device = at::Device(at::kCUDA);
  }
  return input;
}

void require_coorkern_ops() {
  // A program that names no symbol of libcoorkern_ops.so loses it to --as-needed unless it
  // links coorkern::ops; then every torch.ops.coorkern.* call in the model would fail.
  if (!c10::Dispatcher::singleton().findSchema({"coorkern::coor_attention", ""}).has_value()) {
    throw std::runtime_error("the coorkern ops are not registered: libcoorkern_ops.so is not loaded "
                             "(link the CMake target coorkern::ops; docs/cpp.md)");
  }
}

int usage(const char* program) {
  std::fprintf(stderr, "usage: %s MODEL(.pt2|TorchScript file) IMAGE.bmp [IMAGE.bmp ...] [--threads N]\n", program);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
      if (threads < 1) return usage(argv[0]);
    } else if (arg.rfind("--", 0) == 0) {
      return usage(argv[0]);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) return usage(argv[0]);
  try {
    if (threads > 0) at::set_num_threads(threads);
    require_coorkern_ops();
    const std::string model_path = positional[0];
    auto detector = load_detector(model_path);
    const ModelInput input = check_metadata(detector->metadata(), model_path);
    std::vector<detect::GreyImage> images;
    for (size_t i = 1; i < positional.size(); ++i) images.push_back(detect::read_grey_bmp(positional[i]));

    c10::InferenceMode guard;
    std::printf("image,landmark,x,y,confidence\n");
    for (size_t i = 0; i < images.size(); ++i) {
      const auto& image = images[i];
      const at::Tensor pixels = at::from_blob(const_cast<float*>(image.pixels.data()),
                                              {1, 1, image.height, image.width}, at::kFloat);
      // coorkern predict: F.interpolate(mode="bilinear", align_corners=False, antialias=True), on the CPU.
      const at::Tensor resized =
          at::_upsample_bilinear2d_aa(pixels, {input.height, input.width}, /*align_corners=*/false);
      const Outputs out = detector->run(resized.to(input.device));
      const float scale_x = float(double(image.width) / double(input.width));
      const float scale_y = float(double(image.height) / double(input.height));
      const auto coords = out.coords.contiguous();
      const auto confidence = out.confidence.contiguous();
      const float* xy = coords.data_ptr<float>();
      const float* conf = confidence.data_ptr<float>();
      for (int64_t l = 0; l < coords.size(1); ++l) {
        const float x = (xy[2 * l] + 0.5f) * scale_x - 0.5f;
        const float y = (xy[2 * l + 1] + 0.5f) * scale_y - 0.5f;
        std::printf("%s,%lld,%.3f,%.3f,%.4f\n", positional[i + 1].c_str(), static_cast<long long>(l), x, y, conf[l]);
      }
    }
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "coorkern_detect: error: %s\n",
                 first_line(e.what_without_backtrace()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "coorkern_detect: error: %s\n", first_line(e.what()).c_str());
    return 1;
  }
  return 0;
}
