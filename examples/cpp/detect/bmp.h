// A tiny reader of grey BMP files, so that the example needs no image library: 8-bit,
// uncompressed, with a grey palette -- the format of the ISBI 2015 cephalograms, and what
// Pillow writes for a mode "L" image.  Colour BMPs (24/32-bit, or a colour palette),
// other bit depths and compressed files are refused with a message naming the file.
#pragma once

#include <string>
#include <vector>

namespace detect {

struct GreyImage {
  int width = 0;
  int height = 0;
  std::vector<float> pixels;  // row-major, top row first, in [0, 1] (value / 255, as coorkern's reader)
};

// Throws std::runtime_error("<path>: <reason>") for a missing, truncated or unsupported file.
GreyImage read_grey_bmp(const std::string& path);

}  // namespace detect
