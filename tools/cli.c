#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CLI_MAX_OPTIONS 64
#define CLI_HELP_ID 1000

static int count_options(const cli_command *cmd)
{
    int n = 0;
    while (cmd->options && cmd->options[n].name) n++;
    return n;
}

static void print_default(FILE *f, const cli_option *o)
{
    switch (o->kind) {
    case CLI_FLAG: break;
    case CLI_INT: fprintf(f, " (default: %d)", *(int *)o->dest); break;
    case CLI_DOUBLE: fprintf(f, " (default: %g)", *(double *)o->dest); break;
    case CLI_STRING:
        if (*(const char **)o->dest) fprintf(f, " (default: %s)", *(const char **)o->dest);
        break;
    case CLI_STRING_LIST: fprintf(f, " (repeatable)"); break;
    }
}

void cli_print_usage(FILE *f, const char *prog, const cli_command *cmd)
{
    fprintf(f, "usage: %s %s [options]%s%s\n\n%s\n\noptions:\n", prog, cmd->name, cmd->args ? " " : "",
            cmd->args ? cmd->args : "", cmd->summary);
    int n = count_options(cmd);
    for (int i = 0; i < n; i++) {
        const cli_option *o = &cmd->options[i];
        char left[96];
        int k = 0;
        if (o->short_name)
            k = snprintf(left, sizeof left, "  -%c, --%s", o->short_name, o->name);
        else
            k = snprintf(left, sizeof left, "      --%s", o->name);
        if (o->kind != CLI_FLAG && k > 0 && (size_t)k < sizeof left)
            snprintf(left + k, sizeof left - (size_t)k, " %s", o->metavar ? o->metavar : "VALUE");
        fprintf(f, "%-32s %s", left, o->help);
        print_default(f, o);
        fputc('\n', f);
    }
    fprintf(f, "%-32s %s\n", "  -h, --help", "show this help");
}

/* ---- Markdown reference (docs/commands.md, `terraseg help --markdown`) ---- */

/* Text in a Markdown table cell: '|' would end the cell. */
static void md_text(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '|') fputc('\\', f);
        fputc(*s, f);
    }
}

/* A number of an option's range: whole numbers without a fraction. */
static void md_number(FILE *f, double v)
{
    if (v == floor(v) && fabs(v) < 1e15)
        fprintf(f, "%.0f", v);
    else
        fprintf(f, "%g", v);
}

/* The default as cli_print_usage shows it, except where the value stands
 * for something that depends on the machine: an option named "threads"
 * whose 0 means TERRASEG_THREADS or every core is "all cores", so the
 * generated page is the same on every machine. */
static void md_default(FILE *f, const cli_option *o)
{
    switch (o->kind) {
    case CLI_FLAG: fputs("off", f); break;
    case CLI_INT:
        if (strcmp(o->name, "threads") == 0 && *(int *)o->dest == 0)
            fputs("all cores", f);
        else
            fprintf(f, "`%d`", *(int *)o->dest);
        break;
    case CLI_DOUBLE: fprintf(f, "`%g`", *(double *)o->dest); break;
    case CLI_STRING:
        if (*(const char **)o->dest) {
            fputc('`', f);
            md_text(f, *(const char **)o->dest);
            fputc('`', f);
        } else {
            fputs("none", f);
        }
        break;
    case CLI_STRING_LIST: fputs("none (repeatable)", f); break;
    }
}

static void md_range(FILE *f, const cli_option *o)
{
    if (o->kind != CLI_INT && o->kind != CLI_DOUBLE) return;
    if (o->max >= 2147483647.0) {
        fputs(">= ", f);
        md_number(f, o->min);
    } else {
        md_number(f, o->min);
        fputs(" to ", f);
        md_number(f, o->max);
    }
}

void cli_print_markdown(FILE *f, const char *prog, const cli_command *cmd)
{
    fprintf(f, "## %s %s\n\n```\n%s %s [options]%s%s\n```\n\n", prog, cmd->name, prog, cmd->name,
            cmd->args ? " " : "", cmd->args ? cmd->args : "");
    fprintf(f, "%s\n\n", cmd->summary);
    int n = count_options(cmd);
    if (n == 0) {
        fputs("No options besides `-h`, `--help`.\n", f);
        return;
    }
    fputs("| option | default | range | meaning |\n|---|---|---|---|\n", f);
    for (int i = 0; i < n; i++) {
        const cli_option *o = &cmd->options[i];
        fputs("| ", f);
        if (o->short_name) fprintf(f, "`-%c`, ", o->short_name);
        fprintf(f, "`--%s", o->name);
        if (o->kind != CLI_FLAG) {
            fputc(' ', f);
            md_text(f, o->metavar ? o->metavar : "VALUE");
        }
        fputs("` | ", f);
        md_default(f, o);
        fputs(" | ", f);
        md_range(f, o);
        fputs(" | ", f);
        md_text(f, o->help);
        fputs(" |\n", f);
    }
}

static int parse_value(const char *prog, const cli_command *cmd, const cli_option *o, const char *arg)
{
    char *end = NULL;
    errno = 0;
    if (o->kind == CLI_STRING) {
        *(const char **)o->dest = arg;
        return 0;
    }
    if (o->kind == CLI_STRING_LIST) {
        cli_strings *l = o->dest;
        const char **v = realloc(l->v, (size_t)(l->n + 1) * sizeof *v);
        if (!v) {
            fprintf(stderr, "%s %s: out of memory\n", prog, cmd->name);
            return 2;
        }
        v[l->n++] = arg;
        l->v = v;
        return 0;
    }
    double v = strtod(arg, &end);
    if (errno || end == arg || *end != '\0' || !isfinite(v)) {
        fprintf(stderr, "%s %s: --%s expects a number, got \"%s\"\n", prog, cmd->name, o->name, arg);
        return 2;
    }
    if (o->kind == CLI_INT && v != floor(v)) {
        fprintf(stderr, "%s %s: --%s expects a whole number, got \"%s\"\n", prog, cmd->name, o->name, arg);
        return 2;
    }
    if (v < o->min || v > o->max) {
        fprintf(stderr, "%s %s: --%s must be between %g and %g, got %s\n", prog, cmd->name, o->name, o->min, o->max,
                arg);
        return 2;
    }
    if (o->kind == CLI_INT)
        *(int *)o->dest = (int)v;
    else
        *(double *)o->dest = v;
    return 0;
}

int cli_parse(const char *prog, const cli_command *cmd, int argc, char **argv, int *first_positional)
{
    int n = count_options(cmd);
    if (n + 2 > CLI_MAX_OPTIONS) {
        fprintf(stderr, "%s %s: too many options in the table\n", prog, cmd->name);
        return 2;
    }
    struct option longopts[CLI_MAX_OPTIONS];
    char shortopts[3 * CLI_MAX_OPTIONS + 2];
    size_t s = 0;
    shortopts[s++] = ':'; /* report a missing value as ':' so we can name the option */
    for (int i = 0; i < n; i++) {
        const cli_option *o = &cmd->options[i];
        longopts[i] = (struct option){o->name, o->kind == CLI_FLAG ? no_argument : required_argument, NULL, i};
        if (o->short_name) {
            shortopts[s++] = o->short_name;
            if (o->kind != CLI_FLAG) shortopts[s++] = ':';
        }
    }
    longopts[n] = (struct option){"help", no_argument, NULL, CLI_HELP_ID};
    longopts[n + 1] = (struct option){NULL, 0, NULL, 0};
    shortopts[s++] = 'h';
    shortopts[s] = '\0';

    optind = 1;
    opterr = 0; /* we print our own messages, naming the command */
    for (;;) {
        int longindex = -1;
        int c = getopt_long(argc, argv, shortopts, longopts, &longindex);
        if (c == -1) break;
        if (c == CLI_HELP_ID || c == 'h') {
            cli_print_usage(stdout, prog, cmd);
            return 1;
        }
        if (c == '?' || c == ':') {
            const char *bad = argv[optind - 1];
            if (c == ':')
                fprintf(stderr, "%s %s: option %s needs a value\n", prog, cmd->name, bad);
            else
                fprintf(stderr, "%s %s: unknown option %s (see '%s %s --help')\n", prog, cmd->name, bad, prog,
                        cmd->name);
            return 2;
        }
        const cli_option *o = NULL;
        if (c >= 0 && c < n)
            o = &cmd->options[c];
        else
            for (int i = 0; i < n; i++)
                if (cmd->options[i].short_name == c) o = &cmd->options[i];
        if (!o) {
            fprintf(stderr, "%s %s: unknown option (see '%s %s --help')\n", prog, cmd->name, prog, cmd->name);
            return 2;
        }
        if (o->kind == CLI_FLAG)
            *(int *)o->dest = 1;
        else if (parse_value(prog, cmd, o, optarg))
            return 2;
    }
    *first_positional = optind;
    return 0;
}
