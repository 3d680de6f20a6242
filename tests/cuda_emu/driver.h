// Driver side of the harness: a case is a directory with params.txt ("key value" lines) and raw
// little-endian arrays <name>.bin written by tests/test_cuda_emu.py; outputs go to <name>.out.
// A launcher that returns an error prints "cuda error <code>" and exits with status 3.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace driver {

struct Case {
  std::string dir;
  std::map<std::string, std::string> params;

  explicit Case(const char* d) : dir(d) {
    std::ifstream in(dir + "/params.txt");
    std::string key, value;
    while (in >> key >> value) params[key] = value;
  }
  bool has(const std::string& k) const { return params.count(k) != 0; }
  const std::string& str(const std::string& k) const {
    auto it = params.find(k);
    if (it == params.end()) {
      std::fprintf(stderr, "driver: missing parameter %s\n", k.c_str());
      std::exit(2);
    }
    return it->second;
  }
  int64_t i(const std::string& k) const { return std::stoll(str(k)); }
  int64_t i(const std::string& k, int64_t fallback) const { return has(k) ? i(k) : fallback; }
  double f(const std::string& k) const { return std::stod(str(k)); }
  std::vector<int64_t> list(const std::string& k) const {
    std::vector<int64_t> out;
    std::stringstream ss(str(k));
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
    return out;
  }

  std::vector<unsigned char> read(const std::string& name) const {
    std::ifstream in(dir + "/" + name + ".bin", std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "driver: missing array %s\n", name.c_str());
      std::exit(2);
    }
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
  }
  void write(const std::string& name, const void* data, size_t bytes) const {
    std::ofstream out(dir + "/" + name + ".out", std::ios::binary);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  }
};

// "Device" memory: a heap block of exactly offset + bytes (AddressSanitizer bounds it), the array
// starting `offset` bytes in (misaligned rows); without contents it is filled with 0xFF.
inline void* device_bytes(size_t bytes, size_t offset, const void* contents = nullptr) {
  auto* base = static_cast<unsigned char*>(std::malloc(offset + bytes + (offset + bytes == 0)));
  std::memset(base, 0xFF, offset + bytes);
  if (contents && bytes) std::memcpy(base + offset, contents, bytes);
  return base + offset;
}
template <class T>
T* device_array(const Case& c, const std::string& name, size_t offset_elements = 0) {
  const std::vector<unsigned char> host = c.read(name);
  if (host.size() % sizeof(T) != 0) {
    std::fprintf(stderr, "driver: %s has %zu bytes, not a multiple of %zu\n", name.c_str(), host.size(), sizeof(T));
    std::exit(2);
  }
  return static_cast<T*>(device_bytes(host.size(), offset_elements * sizeof(T), host.data()));
}
template <class T>
T* device_empty(size_t count, size_t offset_elements = 0) {
  return static_cast<T*>(device_bytes(count * sizeof(T), offset_elements * sizeof(T)));
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("cuda error %d (%s): %s\n", static_cast<int>(e), cudaGetErrorString(e), what);
    std::exit(3);
  }
}

// Calls f(T{}) for the dtype named by the "dtype" parameter (f32, f16, bf16).
template <class F>
void with_dtype(const Case& c, F&& f) {
  const std::string& d = c.str("dtype");
  if (d == "f32") f(float{});
  else if (d == "f16") f(__half{});
  else if (d == "bf16") f(__nv_bfloat16{});
  else {
    std::fprintf(stderr, "driver: dtype %s\n", d.c_str());
    std::exit(2);
  }
}

}  // namespace driver
