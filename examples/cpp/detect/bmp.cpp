#include "bmp.h"

#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace detect {
namespace {

constexpr int kMaxSide = 1 << 15;  // larger than any radiograph; keeps the buffer sizes sane

uint32_t u32(const std::vector<unsigned char>& b, size_t at) {
  return uint32_t(b[at]) | uint32_t(b[at + 1]) << 8 | uint32_t(b[at + 2]) << 16 | uint32_t(b[at + 3]) << 24;
}

uint16_t u16(const std::vector<unsigned char>& b, size_t at) { return uint16_t(b[at] | b[at + 1] << 8); }

}  // namespace

GreyImage read_grey_bmp(const std::string& path) {
  auto fail = [&](const std::string& why) { return std::runtime_error(path + ": " + why); };
  std::ifstream file(path, std::ios::binary);
  if (!file) throw fail("cannot open the image file (missing or unreadable)");
  const std::vector<unsigned char> b((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());

  if (b.size() < 54 || b[0] != 'B' || b[1] != 'M') throw fail("not a BMP file (this example reads 8-bit grey BMP)");
  const uint32_t pixel_offset = u32(b, 10);
  const uint32_t header_size = u32(b, 14);
  if (header_size < 40 || 14 + size_t(header_size) > b.size()) throw fail("unsupported BMP header (OS/2 or truncated)");
  const int32_t width = int32_t(u32(b, 18));
  const int32_t signed_height = int32_t(u32(b, 22));  // negative: rows stored top-down
  const uint16_t bits = u16(b, 28);
  const uint32_t compression = u32(b, 30);
  const uint32_t colours_used = u32(b, 46);

  const int64_t height = signed_height < 0 ? -int64_t(signed_height) : signed_height;
  if (width < 1 || height < 1 || width > kMaxSide || height > kMaxSide) {
    throw fail("invalid image size " + std::to_string(width) + "x" + std::to_string(signed_height) +
               " (width and height must be 1.." + std::to_string(kMaxSide) + ")");
  }
  if (bits == 24 || bits == 32) {
    throw fail("a " + std::to_string(bits) + "-bit colour image (" + std::to_string(bits / 8) +
               " channels); the detector takes grey images (1 channel): convert it to 8-bit grey");
  }
  if (bits != 8) throw fail("unsupported BMP bit depth " + std::to_string(bits) + " (this example reads 8-bit grey)");
  if (compression != 0) throw fail("compressed BMP (compression " + std::to_string(compression) + ") is not supported");

  const size_t palette_at = 14 + size_t(header_size);
  const size_t entries = colours_used ? colours_used : 256;
  if (entries > 256 || palette_at + 4 * entries > b.size()) throw fail("truncated or invalid BMP palette");
  std::vector<float> grey(256, 0.0f);
  for (size_t i = 0; i < entries; ++i) {
    const unsigned char* entry = b.data() + palette_at + 4 * i;  // blue, green, red, reserved
    const unsigned char blue = entry[0], green = entry[1], red = entry[2];
    if (red != green || green != blue) {
      throw fail("a colour-palette image (3 channels); the detector takes grey images (1 channel): convert it to grey");
    }
    grey[i] = float(red) / 255.0f;
  }

  const size_t stride = (size_t(width) + 3) / 4 * 4;  // rows are padded to 4 bytes
  if (size_t(pixel_offset) + stride * size_t(height) > b.size()) {
    throw fail("truncated pixel data (" + std::to_string(b.size()) + " bytes for a " + std::to_string(width) + "x" +
               std::to_string(height) + " image)");
  }
  GreyImage image;
  image.width = width;
  image.height = int(height);
  image.pixels.resize(size_t(width) * size_t(height));
  for (int64_t row = 0; row < height; ++row) {
    const int64_t stored = signed_height < 0 ? row : height - 1 - row;  // bottom-up unless the height is negative
    const unsigned char* src = b.data() + pixel_offset + stride * size_t(stored);
    float* dst = image.pixels.data() + size_t(row) * size_t(width);
    for (int32_t x = 0; x < width; ++x) dst[x] = grey[src[x]];
  }
  return image;
}

}  // namespace detect
