// mhc report: training and validation loss and the mHC gain metrics of one or more runs,
// as CSV files, PNG charts (gnuplot; every run on the same charts) and a markdown summary.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "apps/mhc/commands.h"
#include "core/error.h"

namespace mhc::app {

namespace fs = std::filesystem;

namespace {

struct Run {
  std::string name, label, csv;
  nlohmann::json config;
  std::vector<nlohmann::json> steps, evals;
};

Run read_run(const std::string& dir) {
  Run run;
  run.name = fs::path(dir).filename().string();
  if (run.name.empty()) run.name = fs::path(dir).parent_path().filename().string();
  const fs::path metrics = fs::path(dir) / "metrics.jsonl", config = fs::path(dir) / "config.json";
  std::ifstream in(metrics);
  check(in.good(), metrics.string() + ": cannot open (is " + dir + " a run directory?)");
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    const auto record = nlohmann::json::parse(line, nullptr, false);
    check(!record.is_discarded() && record.is_object() && record.contains("step"),
          metrics.string() + ":" + std::to_string(number) + ": not a metrics record");
    (record.contains("val_loss") ? run.evals : run.steps).push_back(record);
  }
  check(!run.steps.empty(), metrics.string() + ": no training steps recorded");
  std::ifstream cin(config);
  if (cin.good()) run.config = nlohmann::json::parse(cin, nullptr, false);
  const std::string connection = run.config.is_object() ? run.config.value("connection", std::string("?")) : "?";
  const int64_t n = run.config.is_object() ? run.config.value("num_residual_streams", int64_t{0}) : 0;
  run.label = run.name + " (" + connection + (connection == "residual" ? "" : ", n=" + std::to_string(n)) + ")";
  return run;
}

double number(const nlohmann::json& record, const char* key) {
  return record.contains(key) && record[key].is_number() ? record[key].get<double>() : NAN;
}

// Columns: step loss val_loss gain_fwd_max gain_bwd_max composite_fwd composite_bwd (NaN where absent).
void write_csv(Run& run, const fs::path& path) {
  std::map<int64_t, double> val;
  for (const auto& e : run.evals) val[e["step"].get<int64_t>()] = number(e, "val_loss");
  std::ofstream out(path);
  check(out.good(), path.string() + ": cannot create");
  out << "step,loss,val_loss,gain_fwd_max,gain_bwd_max,composite_gain_fwd_max,composite_gain_bwd_max,tokens_per_s\n";
  for (const auto& r : run.steps) {
    const int64_t step = r["step"].get<int64_t>();
    const double v = val.count(step) ? val[step] : NAN;
    out << step << "," << number(r, "loss") << "," << v << "," << number(r, "gain_fwd_max") << ","
        << number(r, "gain_bwd_max") << "," << number(r, "composite_gain_fwd_max") << ","
        << number(r, "composite_gain_bwd_max") << "," << number(r, "tokens_per_s") << "\n";
  }
  run.csv = path.string();
}

bool have_gnuplot() { return std::system("command -v gnuplot > /dev/null 2>&1") == 0; }

void plot(const std::vector<Run>& runs, const fs::path& png, const fs::path& script_path) {
  std::ofstream g(script_path);
  check(g.good(), script_path.string() + ": cannot create");
  // The gain panels only where some run has gain metrics (hc/mhc runs on the CPU).
  bool gains = false;
  for (const Run& r : runs)
    for (const auto& s : r.steps) gains = gains || s.contains("composite_gain_bwd_max");
  g << "set terminal pngcairo size 1400," << (gains ? 1000 : 500) << " noenhanced\nset output '" << png.string()
    << "'\n"
    << "set datafile separator ','\nset datafile missing 'nan'\nset key top right\nset grid\n"
    << "set multiplot layout " << (gains ? "2,2" : "1,2") << " title 'mhc runs'\n";
  auto panel = [&](const char* title, int column, bool log_scale, bool points) {
    // Gains sit at exactly 1 for mHC: start the log axis below 1 so that curve stays visible.
    g << "set title '" << title << "'\nset xlabel 'step'\n"
      << (log_scale ? "set logscale y\nset yrange [0.8:*]\n" : "unset logscale y\nset yrange [*:*]\n") << "plot ";
    for (size_t i = 0; i < runs.size(); ++i)
      g << (i ? ", " : "") << "'" << runs[i].csv << "' using 1:" << column << " every ::1 with "
        << (points ? "linespoints" : "lines") << " title '" << runs[i].label << "'";
    g << "\n";
  };
  panel("training loss", 2, false, false);
  panel("validation loss", 3, false, true);
  if (gains) {
    panel("composite H_res gain, backward (max over tokens)", 7, true, false);
    panel("H_res gain, forward (max over layers and tokens)", 4, true, false);
  }
  g << "unset multiplot\n";
  g.close();
  const std::string log = script_path.string() + ".log";  // gnuplot's warnings (constant curves) go here
  const std::string command = "gnuplot '" + script_path.string() + "' 2> '" + log + "'";
  check(std::system(command.c_str()) == 0, "gnuplot failed on " + script_path.string() + " (see " + log + ")");
}

struct ReportOptions {
  std::vector<std::string> runs;
  std::string out = "report.png";
};

int run_report(const ReportOptions& o) {
  std::vector<Run> runs;
  for (const std::string& dir : o.runs) runs.push_back(read_run(dir));
  const fs::path png = o.out;
  check(png.extension() == ".png", "--out: '" + o.out + "' must end in .png");
  const fs::path base = png.parent_path() / png.stem();
  if (!png.parent_path().empty()) fs::create_directories(png.parent_path());
  for (Run& r : runs) write_csv(r, base.string() + "-" + r.name + ".csv");

  std::ofstream md(base.string() + ".md");
  check(md.good(), base.string() + ".md: cannot create");
  md << "# mhc report\n\n| run | steps | final loss | best val_loss | tokens/s | max composite gain (bwd) |\n"
     << "|---|---|---|---|---|---|\n";
  for (const Run& r : runs) {
    double best = INFINITY, composite = 0, rate = 0;
    for (const auto& e : r.evals) best = std::min(best, number(e, "val_loss"));
    for (const auto& s : r.steps) {
      const double c = number(s, "composite_gain_bwd_max");
      if (!std::isnan(c)) composite = std::max(composite, c);
      rate += number(s, "tokens_per_s") / static_cast<double>(r.steps.size());
    }
    char line[512];
    std::snprintf(line, sizeof(line), "| %s | %lld | %.4f | %.4f | %.0f | %s |\n", r.label.c_str(),
                  static_cast<long long>(r.steps.back()["step"].get<int64_t>()), number(r.steps.back(), "loss"), best,
                  rate, composite > 0 ? std::to_string(composite).substr(0, 6).c_str() : "-");
    md << line;
  }
  md << "\nCSV per run: `" << base.string() << "-<run>.csv`. Chart: `" << png.string() << "`.\n";
  md.close();
  std::printf("wrote %s.md and %zu CSV file(s)\n", base.string().c_str(), runs.size());
  if (!have_gnuplot()) {
    std::printf("gnuplot is not installed, so no chart was drawn; install it (Debian: apt-get install gnuplot-nox) "
                "and run mhc report again\n");
    return 0;
  }
  plot(runs, png, base.string() + ".gp");
  std::printf("wrote %s\n", png.string().c_str());
  return 0;
}

}  // namespace

Command add_report_command(CLI::App& app) {
  auto o = std::make_shared<ReportOptions>();
  CLI::App* cmd = app.add_subcommand(
      "report",
      "Charts of training and validation loss and the mHC gain metrics of one or more runs on the same axes "
      "(PNG through gnuplot), a CSV per run and a markdown summary beside the PNG.");
  cmd->add_option("runs", o->runs, "run directories")->required();
  cmd->add_option("--out", o->out, "chart file; the CSV and .md files go beside it")->capture_default_str();
  return [cmd, o] { return cmd->parsed() ? run_report(*o) : -1; };
}

}  // namespace mhc::app
