// libtorch's Kineto profiler behind two C calls (tch binds no profiler): `DMSAE_KINETO`'s
// window of training steps or extraction batches (profile.rs). The table it writes sums each
// kernel's (on CUDA) or op's (on the CPU) time over the window, most expensive first; on CUDA
// the window's events go to PATH.events as well, for profile.rs's account of idle time.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

static std::set<impl::ActivityType> activities(bool cuda) {
  std::set<impl::ActivityType> a{impl::ActivityType::CPU};
  if (cuda) a.insert(impl::ActivityType::CUDA);
  return a;
}

static bool g_cuda = false;

extern "C" int dmsae_kineto_start(int cuda, char* err, size_t err_len) {
  try {
    g_cuda = cuda != 0;
    impl::ProfilerConfig cfg(impl::ProfilerState::KINETO);
    prof::prepareProfiler(cfg, activities(g_cuda));
    prof::enableProfiler(cfg, activities(g_cuda));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

// Every event of a CUDA window as rows for profile.rs's analysis of where the device idles:
//   D <start ns> <end ns> <linked correlation id> <name>   a kernel, copy or fill on the device
//   H <start ns> <end ns> <thread> <correlation id> <name> an op or CUDA call on the host
// A device event's linked id is the correlation id of the host op that launched it.
static void write_events(prof::ProfilerResult& result, const std::string& path) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    for (const auto& e : result.events()) {
      std::string name = e.name();
      for (char& c : name)
        if (c == '\t' || c == '\n') c = ' ';
      if (e.deviceType() != c10::DeviceType::CPU) {
        out << "D\t" << e.startNs() << '\t' << e.endNs() << '\t' << e.linkedCorrelationId()
            << '\t' << name << '\n';
      } else {
        out << "H\t" << e.startNs() << '\t' << e.endNs() << '\t' << e.startThreadId() << '\t'
            << e.correlationId() << '\t' << name << '\n';
      }
    }
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot rename to " + path);
}

// Lines "ms per unit <TAB> calls per unit <TAB> device <TAB> name" under a header: on CUDA the
// device's kernels and copies, on the CPU the ops' inclusive times (an op's time counts in
// its callers' too).
extern "C" int dmsae_kineto_stop(const char* path, double units, double wall_s, char* err,
                                 size_t err_len) {
  try {
    auto result = prof::disableProfiler();
    struct Sum {
      double ns = 0;
      double calls = 0;
    };
    std::map<std::pair<std::string, std::string>, Sum> by;
    double device_ns = 0;
    for (const auto& e : result->events()) {
      bool on_device = e.deviceType() != c10::DeviceType::CPU;
      if (g_cuda != on_device) continue;
      std::string name = e.name();
      if (name.size() > 150) name = name.substr(0, 150) + "...";
      auto& s = by[{on_device ? "cuda" : "cpu", name}];
      s.ns += static_cast<double>(e.durationNs());
      s.calls += 1;
      if (on_device) device_ns += static_cast<double>(e.durationNs());
    }
    std::vector<std::pair<std::pair<std::string, std::string>, Sum>> rows(by.begin(), by.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
    std::string tmp = std::string(path) + ".tmp";
    {
      std::ofstream out(tmp);
      char line[512];
      std::snprintf(line, sizeof line,
                    "# %g units over %.3f s wall (%.2f ms a unit); device busy %.2f ms a unit\n",
                    units, wall_s, 1e3 * wall_s / units, device_ns / 1e6 / units);
      out << line << "# ms/unit\tcalls/unit\tdevice\tname\n";
      for (const auto& [key, s] : rows) {
        std::snprintf(line, sizeof line, "%.3f\t%.1f\t%s\t", s.ns / 1e6 / units, s.calls / units,
                      key.first.c_str());
        out << line << key.second << "\n";
      }
      if (!out) throw std::runtime_error(std::string("cannot write ") + tmp);
    }
    if (std::rename(tmp.c_str(), path) != 0)
      throw std::runtime_error(std::string("cannot rename to ") + path);
    if (g_cuda) write_events(*result, std::string(path) + ".events");
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}
