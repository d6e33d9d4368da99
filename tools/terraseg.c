/* The terraseg command: a thin main over the library (GDAL's _bin/_lib
 * split). Each subcommand has one option table (tools/cli.h) that gives both
 * its parser and its --help text. The library never exits; this file turns
 * statuses into exit codes: 0 success, 1 failure, 2 usage error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/backend.h"
#include "kernels/threads.h"
#include "io/io.h"
#include "tools/bench/bench.h"
#include "tools/cli.h"
#include "tools/cmd_demo.h"
#include "tools/cmd_eval.h"
#include "tools/cmd_polygonize.h"
#include "tools/cmd_predict.h"
#include "tools/cmd_qc.h"
#include "tools/cmd_rasterize.h"
#include "tools/cmd_tile.h"
#include "tools/cmd_train.h"
#include "tools/cmd_windows.h"
#include "tools/commands.h"
#ifdef TERRASEG_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

static const char *prog = "terraseg";

/* ---- terraseg version ---- */
static int run_version(int argc, char **argv)
{
    (void)argv;
    if (argc > 0) {
        fprintf(stderr, "%s version: takes no arguments\n", prog);
        return 2;
    }
    char buf[512];
    ts_threads_init(0);
    printf("terraseg %s\n", TERRASEG_VERSION);
    ts_blas_describe(buf, sizeof buf);
    printf("  cpu backend: %s\n", buf);
#ifdef TERRASEG_HAVE_CUDA
    ts_cuda_describe(buf, sizeof buf);
    printf("  cuda backend: built; %s\n", buf);
#else
    printf("  cuda backend: not built\n");
#endif
    ts_gdal_init();
    ts_gdal_describe(buf, sizeof buf);
    printf("  geospatial: %s\n", buf);
    if (getenv("TERRASEG_CORETYPE_SET"))
        printf("  note: OpenBLAS did not recognise this CPU; terraseg set OPENBLAS_CORETYPE=%s from its feature flags\n",
               getenv("TERRASEG_CORETYPE_SET"));
    else if (ts_blas_better_coretype())
        printf("  warning: OpenBLAS runs generic kernels on this CPU; set OPENBLAS_CORETYPE=%s for speed\n",
               ts_blas_better_coretype());
    /* Our loops and OpenBLAS must share the OpenMP pool (docs/architecture.md). */
    if (ts_blas_threading() != 2)
        printf("  warning: OpenBLAS is not the OpenMP build; its threads and terraseg's may oversubscribe the cores\n");
    return 0;
}

static cli_option version_options[] = {{0}};

/* ---- terraseg bench ---- */
static ts_bench_opts bench_opts = {.batch = 1, .size = 256, .in_channels = 3, .classes = 2, .iters = 3, .device = "cpu"};
static int bench_threads = 0;
static const char *bench_precision = "fp32";

static cli_option bench_options[] = {
    {"batch", 'b', CLI_INT, &bench_opts.batch, "N", "images per batch", 1, 1024},
    {"size", 's', CLI_INT, &bench_opts.size, "PX", "tile height and width of the synthetic tile", 32, 8192},
    {"in-channels", 0, CLI_INT, &bench_opts.in_channels, "N", "input bands", 1, 256},
    {"classes", 0, CLI_INT, &bench_opts.classes, "K", "output classes", 1, 1024},
    {"iters", 'n', CLI_INT, &bench_opts.iters, "N", "timed repetitions per measurement", 1, 10000},
    {"threads", 't', CLI_INT, &bench_threads, "N", "threads (0: TERRASEG_THREADS or all cores)", 0, 1024},
    {"csv", 0, CLI_STRING, &bench_opts.csv, "FILE", "conv: also write the measurements as CSV (for tools/bench scripts)",
     0, 0},
    {"device", 0, CLI_STRING, &bench_opts.device, "DEV",
     "cpu, cuda or cuda:N: the backend conv, model and train run on", 0, 0},
    {"tf32", 0, CLI_FLAG, &bench_opts.tf32, NULL, "with --device cuda: TF32 tensor-core math for fp32 convs and GEMMs",
     0, 0},
    {"cudnn-benchmark", 0, CLI_FLAG, &bench_opts.cudnn_benchmark, NULL,
     "with --device cuda: choose each conv's algorithm by timing cuDNN's candidates on first use "
     "(torch.backends.cudnn.benchmark) instead of cuDNN's heuristic ranking",
     0, 0},
    {"precision", 0, CLI_STRING, &bench_precision, "P",
     "model and train: fp32, or bf16 / fp16 mixed precision (half activations; emulated and slow on the CPU)", 0, 0},
    {"no-graphs", 0, CLI_FLAG, &bench_opts.no_graphs, NULL,
     "model: call every op of the eval forward directly instead of replaying a recorded CUDA graph (to compare)", 0,
     0},
    {0},
};

static int run_bench(int argc, char **argv)
{
    const char *what = argc > 0 ? argv[0] : "conv";
    if (argc > 1) {
        fprintf(stderr, "%s bench: expected one benchmark name, got %d arguments\n", prog, argc);
        return 2;
    }
    if (strcmp(what, "conv") != 0 && strcmp(what, "model") != 0 && strcmp(what, "train") != 0) {
        fprintf(stderr, "%s bench: unknown benchmark \"%s\"; available: conv, model, train\n", prog, what);
        return 2;
    }
    if (strcmp(bench_precision, "fp32") == 0)
        bench_opts.precision = TS_F32;
    else if (strcmp(bench_precision, "bf16") == 0)
        bench_opts.precision = TS_BF16;
    else if (strcmp(bench_precision, "fp16") == 0)
        bench_opts.precision = TS_F16;
    else {
        fprintf(stderr, "%s bench: --precision %s: choose fp32, bf16 or fp16\n", prog, bench_precision);
        return 2;
    }
    if (bench_opts.precision != TS_F32 && strcmp(what, "conv") == 0) {
        fprintf(stderr, "%s bench: --precision applies to bench model and bench train\n", prog);
        return 2;
    }
    /* Options a benchmark would not use are refused rather than ignored. */
    if (bench_opts.csv && strcmp(what, "conv") != 0) {
        fprintf(stderr, "%s bench %s: --csv applies to bench conv; bench model and train print their table only\n",
                prog, what);
        return 2;
    }
    if (bench_opts.no_graphs && strcmp(what, "model") != 0) {
        fprintf(stderr, "%s bench %s: --no-graphs applies to bench model (its eval forward)\n", prog, what);
        return 2;
    }
    /* --device, --tf32 and --cudnn-benchmark are refused here, before anything is printed or run. */
    int rc = ts_bench_check_device(&bench_opts, what);
    if (rc) return rc;
    int threads = ts_threads_init(bench_threads);
    printf("terraseg bench %s: %dx%d synthetic tile, batch %d, %d in, %d classes, %d threads, %d "
           "iterations%s%s%s%s%s%s\n",
           what, bench_opts.size, bench_opts.size, bench_opts.batch, bench_opts.in_channels, bench_opts.classes,
           threads, bench_opts.iters, ts_bench_is_cuda(&bench_opts) ? ", device " : "",
           ts_bench_is_cuda(&bench_opts) ? bench_opts.device : "", bench_opts.tf32 ? " (TF32)" : "",
           bench_opts.cudnn_benchmark ? " (cuDNN benchmark)" : "",
           bench_opts.precision != TS_F32 ? ", precision " : "", bench_opts.precision != TS_F32 ? bench_precision : "");
    if (strcmp(what, "conv") == 0) return ts_bench_conv(&bench_opts);
    if (strcmp(what, "model") == 0) return ts_bench_model(&bench_opts);
    if (strcmp(what, "train") == 0) return ts_bench_train(&bench_opts);
    fprintf(stderr, "%s bench: unknown benchmark \"%s\"; available: conv, model, train\n", prog, what);
    return 2;
}

/* ---- the command table ---- */
static const cli_command commands[] = {
    {"version", NULL, "Print the version and what was built in (BLAS, CUDA/cuDNN, GDAL, GEOS).", version_options,
     run_version},
    {"demo", NULL,
     "Run the whole pipeline on a built-in synthetic scene (no data, no network): generate, split, train, "
     "predict, polygonize, and evaluate on held-out blocks.",
     demo_options, run_demo},
    {"info", "MODEL",
     "Describe a model file (.safetensors, .pth/.ckpt or SMP directory): architecture, parameters, model card, "
     "activation memory per tile.",
     info_options, run_info},
    {"convert", "IN OUT", "Convert a model between .pth, .safetensors and an SMP save_pretrained directory.",
     convert_options, run_convert},
    {"rasterize", "LABELS OUT.tif",
     "Write the label mask of LABELS (vector layer or mask raster) on the grid of --like IMAGE as a GeoTIFF.",
     rasterize_options, run_rasterize},
    {"windows", "IMAGE",
     "Make tile windows on IMAGE's grid (a grid with overlap, a CSV, vector features or random) and write them as CSV.",
     windows_options, run_windows},
    {"split", "WINDOWS.csv",
     "Assign windows to train/val/test by spatial blocks with ratios and a seed (optional buffer between splits).",
     split_options, run_split},
    {"tile", "IMAGE", "Write windows of IMAGE (and their label masks) as GeoTIFF tiles, as gdal_translate -srcwin would.",
     tile_options, run_tile},
    {"qc", "IMAGE",
     "Check labels against the image: class histograms per split, suggested class weights, ids >= K, nodata, "
     "geometry warnings.",
     qc_options, run_qc},
    {"train", "CONFIG.yaml",
     "Train the U-Net from a YAML config (--set key=value overrides; --resume a checkpoint; Ctrl-C checkpoints "
     "and stops).",
     train_options, run_train},
    {"predict", "MODEL SCENE OUT.tif",
     "Classify a whole scene: sliding windows with overlap, smooth blending, optional test-time augmentation, "
     "streamed into a georeferenced class-map GeoTIFF in bounded memory (+ probabilities, confidence, quick-look).",
     predict_options, run_predict},
    {"polygonize", "CLASSES.tif OUT.gpkg",
     "Polygonize a class raster (4/8-connected; optional majority filter, sieve, simplification, minimum area, "
     "hole filling) into GPKG (styled for QGIS), GeoJSON, Shapefile or FlatGeobuf with class, area and confidence.",
     polygonize_options, run_polygonize},
    {"eval", "PRED TRUTH",
     "Score a class map against a reference raster or vector layer over the whole scene: IoU, F1, kappa, boundary "
     "F1, areas; JSON and a confusion-matrix PNG on request.",
     eval_options, run_eval},
    {"bench", "[conv|model|train]",
     "Measure on a synthetic tile. conv (the default): every conv shape of the U-Net ResNet-34, forward and "
     "backward GFLOP/s next to this machine's sgemm GFLOP/s. model: the whole U-Net, eval forward and train "
     "forward+backward per tile. train: full training steps (forward, loss, backward, AdamW), ms/step and tiles/s. "
     "--device cuda runs conv on the CUDA backend.",
     bench_options, run_bench},
};
#define N_COMMANDS (int)(sizeof commands / sizeof commands[0])

static void print_main_usage(FILE *f)
{
    fprintf(f,
            "usage: %s <command> [options]\n\n"
            "terraseg trains and runs U-Net ResNet-34 segmentation on geospatial rasters.\n\ncommands:\n",
            prog);
    for (int i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f,
            "\n'%s <command> --help' (or '%s help <command>') lists a command's options;\n"
            "'%s help --markdown' prints them all as Markdown (docs/commands.md).\n",
            prog, prog, prog);
}

/* terraseg help [--markdown] [COMMAND]: the command list, one command's
 * usage, or the command reference as Markdown. The generated part of
 * docs/commands.md is exactly `terraseg help --markdown` (tests/cli.sh
 * checks it; tools/update-docs.sh rewrites it). */
static int run_help(int argc, char **argv)
{
    int markdown = 0;
    const cli_command *only = NULL;
    for (int a = 0; a < argc; a++) {
        if (strcmp(argv[a], "--markdown") == 0) {
            markdown = 1;
            continue;
        }
        const cli_command *c = NULL;
        for (int i = 0; i < N_COMMANDS; i++)
            if (strcmp(argv[a], commands[i].name) == 0) c = &commands[i];
        if (!c || only) {
            fprintf(stderr, "%s help: %s \"%s\" (usage: %s help [--markdown] [COMMAND])\n", prog,
                    c ? "one command at a time, not also" : "unknown command or option", argv[a], prog);
            return 2;
        }
        only = c;
    }
    if (!markdown) {
        if (only)
            cli_print_usage(stdout, prog, only);
        else
            print_main_usage(stdout);
        return 0;
    }
    if (only) {
        cli_print_markdown(stdout, prog, only);
        return 0;
    }
    printf("| command | what it does |\n|---|---|\n");
    for (int i = 0; i < N_COMMANDS; i++)
        printf("| [`%s %s`](#%s-%s) | %s |\n", prog, commands[i].name, prog, commands[i].name, commands[i].summary);
    for (int i = 0; i < N_COMMANDS; i++) {
        printf("\n");
        cli_print_markdown(stdout, prog, &commands[i]);
    }
    return 0;
}

/* If OpenBLAS did not recognise this CPU and fell back to generic kernels,
 * run again with OPENBLAS_CORETYPE set to what the CPU supports: OpenBLAS
 * reads it only when it loads. A user's own OPENBLAS_CORETYPE always wins,
 * and TERRASEG_CORETYPE_SET marks the second run so this happens once. */
static void fix_blas_coretype(char **argv)
{
    if (getenv("OPENBLAS_CORETYPE") || getenv("TERRASEG_CORETYPE_SET")) return;
    const char *better = ts_blas_better_coretype();
    if (!better) return;
    if (setenv("OPENBLAS_CORETYPE", better, 1) || setenv("TERRASEG_CORETYPE_SET", better, 1)) return;
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the generic kernels; `version` warns. */
    unsetenv("OPENBLAS_CORETYPE");
}

int main(int argc, char **argv)
{
    fix_blas_coretype(argv);
    if (argc < 2) {
        print_main_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        print_main_usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "help") == 0) return run_help(argc - 2, argv + 2);
    if (strcmp(argv[1], "--version") == 0) return run_version(0, NULL);
    for (int i = 0; i < N_COMMANDS; i++) {
        if (strcmp(argv[1], commands[i].name) != 0) continue;
        int first = 0;
        int rc = cli_parse(prog, &commands[i], argc - 1, argv + 1, &first);
        if (rc == 1) return 0; /* --help */
        if (rc) return rc;
        return commands[i].run(argc - 1 - first, argv + 1 + first);
    }
    fprintf(stderr, "%s: unknown command \"%s\"\n\n", prog, argv[1]);
    print_main_usage(stderr);
    return 2;
}
